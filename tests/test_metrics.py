"""What a run logs: plain lines without a terminal, a bar whose loss is the train loss on one, timings that
leave out compilation, evaluation and checkpoints, MFU, and one row per (step, split) after a resume."""

import fcntl
import json
import os
import pty
import re
import shutil
import struct
import sys
import termios
import time

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from effjax import metrics, train
from tests.helpers import one_device, run_cli, tiny_config

LINE = re.compile(
  r'^step (\d+)/40  train loss \d+\.\d{4}  lr \d\.\d\de-\d\d  [\d.]+ ms/step  [\d,]+ tok/s  '
  r'MFU \d+\.\d%  ETA \d+:\d\d:\d\d$'
)


@pytest.mark.slow
def test_plain_lines_without_a_terminal(tmp_path, corpus_dir):
  result = run_cli('--config=gpt:tiny', f'--workdir={tmp_path}/run', f'--config.data.corpus={corpus_dir}')
  assert result.returncode == 0, result.stderr[-2000:]
  assert '\r' not in result.stdout + result.stderr
  steps = [int(m.group(1)) for m in map(LINE.match, result.stdout.splitlines()) if m]
  assert steps == [10, 20, 30, 40], result.stdout
  assert re.search(r'^step 20/40  eval loss \d+\.\d{4}  ppl [\d.]+  bpb [\d.]+$', result.stdout, re.M)
  rows = [m for m in metrics.read_metrics(f'{tmp_path}/run') if m['split'] == 'train']
  # MFU is over the host's matmul rate measured once at the start; the suite's other worker can depress that
  # measurement (seen: 1.02 for 2 ms steps), so the bound here is loose: positive, finite, not far above 1.
  assert all(0 < m['mfu'] < 2 and m['step_time'] > 0 for m in rows), [m['mfu'] for m in rows]
  np.testing.assert_allclose([m['tokens_per_sec'] * m['step_time'] for m in rows], 8 * 32)


def test_bar_on_a_terminal_shows_the_train_loss(tmp_path):
  master, slave = pty.openpty()
  fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack('HHHH', 24, 120, 0, 0))  # a 120-column terminal
  saved = sys.stdout
  sys.stdout = os.fdopen(slave, 'w', closefd=False)
  try:
    writer = metrics.MetricsWriter(str(tmp_path), total_steps=4, progress=True)
    writer.advance(2)
    writer.write(2, 'train', {'loss': 1.25, 'lr': 1e-3, 'step_time': 0.01, 'tokens_per_sec': 100.0, 'mfu': 0.5})
    writer.write(2, 'eval', {'loss': 9.5, 'ppl': 13359.7})
    writer.advance(2)
    writer.close()
    sys.stdout.flush()
  finally:
    sys.stdout = saved
  os.close(slave)
  shown = os.read(master, 65536).decode()
  os.close(master)
  assert '\r' in shown and 'loss=1.25' in shown and 'loss=9.5' not in shown
  assert 'step 2/4  eval loss 9.5000' in shown


def test_step_clock_leaves_out_what_is_not_a_step():
  clock = metrics.StepClock(tokens_per_step=100, flops_per_step=1e9, peak=1e12)
  clock.resume()
  for _ in range(3):
    time.sleep(0.02)
    clock.count()
  clock.pause()
  time.sleep(0.3)  # an evaluation or a checkpoint
  clock.resume()
  time.sleep(0.02)
  clock.count()
  clock.pause()
  rates = clock.rates()
  assert 0.02 <= rates['step_time'] < 0.1
  assert np.isclose(rates['tokens_per_sec'], 100 / rates['step_time'])
  assert np.isclose(rates['mfu'], 1e9 / rates['step_time'] / 1e12)
  assert clock.rates() == {'step_time': None, 'tokens_per_sec': None, 'mfu': None}


def test_peak_table_knows_the_accelerators():
  kinds = {
    'TPU v4': 275e12,
    'TPU v5 lite': 197e12,
    'TPU v5': 459e12,
    'TPU v5p': 459e12,
    'TPU v6 lite': 918e12,
    'NVIDIA A100-SXM4-80GB': 312e12,
    'NVIDIA H100 80GB HBM3': 989e12,
    'NVIDIA H100 PCIe': 756e12,
    'NVIDIA H200': 989e12,
  }
  assert {k: metrics.peak_of_kind(k) for k in kinds} == kinds
  assert metrics.peak_of_kind('Some Future Chip') is None
  assert 1e9 < metrics.peak_flops(one_device()) < 1e14  # measured on this CPU


@pytest.mark.slow
def test_resume_from_an_older_checkpoint_keeps_one_row_per_step(tmp_path, corpus_dir):
  """A run killed after logging steps past its last checkpoint: the resumed run's rows replace those rows, for
  metrics.jsonl and for TensorBoard's reader."""
  workdir = tmp_path / 'run'
  config = tiny_config(
    corpus_dir, **{'train.steps': 12, 'train.log_every': 3, 'train.eval_every': 6, 'checkpoint.every': 6}
  )
  train.train_and_evaluate(config, str(workdir), devices=one_device(), progress=False)
  shutil.rmtree(workdir / 'checkpoints' / '12')  # as if killed before the step-12 checkpoint was written
  train.train_and_evaluate(config, str(workdir), devices=one_device(), progress=False)
  rows = [(m['step'], m['split']) for m in metrics.read_metrics(workdir)]
  assert sorted(rows) == sorted(set(rows)) and len(rows) == 6
  reader = event_accumulator.EventAccumulator(str(workdir / 'tb'))
  reader.Reload()
  assert [e.step for e in reader.Scalars('train/loss')] == [3, 6, 9, 12]
  assert [e.step for e in reader.Scalars('eval/loss')] == [6, 12]
  assert json.loads((workdir / 'metrics.jsonl').read_text().splitlines()[-1])['step'] == 12


def test_wandb_offline_run_gets_the_same_rows(tmp_path, corpus_dir, monkeypatch):
  wandb = __import__('pytest').importorskip('wandb')
  monkeypatch.setenv('WANDB_MODE', 'offline')
  monkeypatch.setenv('WANDB_SILENT', 'true')
  workdir = tmp_path / 'run'
  config = tiny_config(
    corpus_dir,
    **{
      'train.steps': 4,
      'train.log_every': 2,
      'train.eval_every': 4,
      'checkpoint.every': 4,
      'train.wandb_project': 'effjax-test',
    },
  )
  train.train_and_evaluate(config, str(workdir), devices=one_device(), progress=False)
  (run_dir,) = (workdir / 'wandb').glob('offline-run-*')
  assert run_dir.name.endswith((workdir / 'wandb_run_id').read_text()) and wandb.__version__
  # wandb ships no reader for its .wandb record log; its history items hold each key and the value's JSON text
  (log,) = run_dir.glob('run-*.wandb')
  data = log.read_bytes()
  rows = metrics.read_metrics(workdir)
  assert b'train/loss' in data and b'train/mfu' in data and b'eval/ppl' in data
  for row in rows:
    assert json.dumps(row['loss']).encode() in data, row
