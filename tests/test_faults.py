"""Reliability under faults: preemption (SIGTERM / SIGINT), corrupt or partial checkpoints, two runs on one
workdir, and NaN/inf divergence."""
from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax import checkpoint, state as state_lib, train
from effjax.errors import EffjaxError
from tests.helpers import ROOT, one_device, tiny_config
from tests.test_bad_input import snapshot

STEPS = 40  # long enough that a signal sent after step 3 always lands mid-run
LONG = {'train.steps': STEPS, 'train.log_every': 1, 'train.eval_every': 10_000, 'checkpoint.every': 10_000}


def train_losses(workdir) -> dict:
  """step -> loss of the train lines of metrics.jsonl (a resumed run's lines replace earlier ones)."""
  out = {}
  path = os.path.join(workdir, 'metrics.jsonl')
  if os.path.exists(path):
    with open(path, encoding='utf-8') as f:
      for line in f:
        try:
          record = json.loads(line)
        except json.JSONDecodeError:  # a line being written right now
          continue
        if record.get('split') == 'train':
          out[record['step']] = record['loss']
  return out


def wait_for_step(workdir, step, timeout=300.0, proc=None):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if max(train_losses(workdir), default=0) >= step:
      return
    if proc is not None and proc.poll() is not None:
      raise AssertionError(f'the run ended early (exit {proc.returncode})')
    time.sleep(0.02)
  raise AssertionError(f'no step {step} in {workdir}/metrics.jsonl after {timeout}s')


def checkpoint_steps(workdir) -> list[int]:
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), 3, read_only=True)
  try:
    return sorted(ckpt.all_steps())
  finally:
    ckpt.close()


def restore(config, workdir, step=None):
  """(state, meta) of a checkpoint (the newest readable one by default), without moving anything."""
  bundle_config = train.resolve_vocab(config, _tokenizer(workdir))
  setup = state_lib.make_setup(bundle_config, devices=one_device())
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), 3, read_only=True)
  try:
    if step is None:
      return train.restore_or_init(setup, bundle_config, ckpt, None, workdir, quarantine=False)
    return ckpt.restore(step, setup.abstract_state)
  finally:
    ckpt.close()


def _tokenizer(workdir):
  from effjax.data import tokenizers  # pylint: disable=import-outside-toplevel
  return tokenizers.load_tokenizer(os.path.join(workdir, 'data'))


def assert_same_params(a, b):
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope='module')
def reference(tmp_path_factory, corpus_dir):
  """The uninterrupted run every preempted run must reproduce (one device, like the CLI subprocesses)."""
  workdir = str(tmp_path_factory.mktemp('reference') / 'run')
  config = tiny_config(corpus_dir, **LONG)
  train.train_and_evaluate(config, workdir, devices=one_device(), progress=False)
  losses = train_losses(workdir)
  assert sorted(losses) == list(range(1, STEPS + 1))
  return {'config': config, 'losses': losses, 'workdir': workdir}


# --------------------------------------------------------------------------------------------------------
# Preemption

def _cli_env():
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}
  return env


def test_sigterm_saves_exits_zero_and_resumes_exactly(tmp_path, corpus_dir, reference):
  """A real preemption: SIGTERM to the CLI mid-run -> checkpoint at that step, exit 0; a second run on the same
  workdir meanwhile refuses; the rerun completes with the losses of the uninterrupted run."""
  workdir = str(tmp_path / 'run')
  args = [sys.executable, '-m', 'effjax.main', '--config=configs/gpt.py:tiny', f'--workdir={workdir}',
          f'--config.data.corpus={corpus_dir}', f'--config.train.steps={STEPS}', '--config.train.log_every=1',
          '--config.train.eval_every=10000', '--config.checkpoint.every=10000', '--progress=false']
  with open(tmp_path / 'stdout', 'w') as out, open(tmp_path / 'stderr', 'w') as err:
    proc = subprocess.Popen(args, cwd=ROOT, env=_cli_env(), stdout=out, stderr=err)
    try:
      wait_for_step(workdir, 3, proc=proc)
      # two runs on one workdir: the second refuses with a clear message and changes nothing
      before = snapshot(workdir)
      with pytest.raises(EffjaxError, match=r'in use by another effjax run \(pid \d+\)'):
        train.train_and_evaluate(reference['config'], workdir, progress=False)
      proc.send_signal(signal.SIGTERM)
      proc.wait(timeout=300)
    finally:
      if proc.poll() is None:
        proc.kill()
  stderr = (tmp_path / 'stderr').read_text()
  assert proc.returncode == 0, stderr[-3000:]
  assert 'Traceback' not in stderr
  stopped = max(train_losses(workdir))
  assert 3 <= stopped < STEPS
  assert checkpoint_steps(workdir) == [stopped]
  assert _setup_files(snapshot(workdir)) == _setup_files(before)  # the refused run rewrote nothing

  rerun = subprocess.run(args, cwd=ROOT, env=_cli_env(), capture_output=True, text=True, timeout=600, check=False)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  losses = train_losses(workdir)
  assert sorted(losses) == list(range(1, STEPS + 1))
  # another process on one device: equal up to float32 reordering (bit-exactness is checked in-process below)
  np.testing.assert_allclose([losses[s] for s in range(1, STEPS + 1)],
                             [reference['losses'][s] for s in range(1, STEPS + 1)], rtol=1e-5)


def _setup_files(snap: dict) -> dict:
  """What a run writes before its first step (config, summary, data cache): not the growing logs/checkpoints."""
  return {k: v for k, v in snap.items() if not any(p in k for p in ('metrics.jsonl', '/tb/', '/checkpoints/'))}


def test_sigint_saves_and_resume_is_bit_identical(tmp_path, reference):
  workdir = str(tmp_path / 'run')
  handler = signal.getsignal(signal.SIGINT)
  sent = threading.Event()

  def interrupt():
    wait_for_step(workdir, 3)
    os.kill(os.getpid(), signal.SIGINT)
    sent.set()

  thread = threading.Thread(target=interrupt, daemon=True)
  thread.start()
  train.train_and_evaluate(reference['config'], workdir, devices=one_device(), progress=False)
  thread.join(timeout=60)
  assert sent.is_set()
  stopped = max(train_losses(workdir))
  assert 3 <= stopped < STEPS and checkpoint_steps(workdir) == [stopped]
  assert signal.getsignal(signal.SIGINT) is handler  # the run restored the handlers it replaced
  train.train_and_evaluate(reference['config'], workdir, devices=one_device(), progress=False)
  assert train_losses(workdir) == reference['losses']
  final, _ = restore(reference['config'], workdir)
  expected, _ = restore(reference['config'], reference['workdir'])
  assert_same_params(final, expected)


def test_second_run_on_a_workdir_refuses(tmp_path, corpus_dir):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'keep.txt').write_text('untouched')
  before = snapshot(str(workdir))
  with train.workdir_lock(str(workdir)):
    with pytest.raises(EffjaxError, match=rf'workdir .* is in use by another effjax run \(pid {os.getpid()}\)'):
      train.train_and_evaluate(tiny_config(corpus_dir, **{'train.steps': 2}), str(workdir), progress=False)
  assert snapshot(str(workdir)) == before and not (workdir / 'data').exists()


# --------------------------------------------------------------------------------------------------------
# Corrupt and partial checkpoints

SIX = {'train.steps': 6, 'checkpoint.every': 2, 'train.log_every': 2, 'train.eval_every': 6}


@pytest.fixture(scope='module')
def six_step_runs(tmp_path_factory, corpus_dir):
  """An uninterrupted 6-step run, and the same run stopped at step 4 (checkpoints 2 and 4)."""
  root = tmp_path_factory.mktemp('corrupt')
  full, stopped = str(root / 'full'), str(root / 'stopped')
  config = tiny_config(corpus_dir, **SIX)
  final_eval = train.train_and_evaluate(config, full, devices=one_device(), progress=False)
  train.train_and_evaluate(tiny_config(corpus_dir, **SIX, **{'train.stop_at': 4}), stopped, devices=one_device(),
                           progress=False)
  assert checkpoint_steps(stopped) == [2, 4]
  return {'config': config, 'full': full, 'stopped': stopped, 'final_eval': final_eval}


def _state_files(step_dir):
  return [f for f in glob.glob(os.path.join(step_dir, 'state', '**', 'd', '*'), recursive=True)
          if os.path.isfile(f)]


def _truncate(step_dir):
  for f in _state_files(step_dir):
    with open(f, 'r+b') as fh:
      fh.truncate(os.path.getsize(f) // 2)


def _garbage(step_dir):
  for f in _state_files(step_dir):
    size = os.path.getsize(f)
    with open(f, 'wb') as fh:
      fh.write(np.random.RandomState(0).bytes(size))


def _flip_bytes(step_dir):
  for f in _state_files(step_dir):
    data = bytearray(open(f, 'rb').read())
    for i in range(len(data) // 2, min(len(data), len(data) // 2 + 16)):
      data[i] ^= 0xFF
    open(f, 'wb').write(bytes(data))


def _missing_state(step_dir):  # a step directory whose state item never got written
  shutil.rmtree(os.path.join(step_dir, 'state'))


def _bad_meta(step_dir):
  with open(os.path.join(step_dir, 'meta', 'metadata'), 'w', encoding='utf-8') as f:
    f.write('{"step": 4, ')


def _bad_data_iterator(step_dir):
  for f in glob.glob(os.path.join(step_dir, 'data', '*.json')):
    with open(f, 'w', encoding='utf-8') as fh:
      fh.write('not json')


CORRUPTIONS = {'truncated': _truncate, 'garbage': _garbage, 'flipped_bytes': _flip_bytes,
               'missing_state': _missing_state, 'bad_meta': _bad_meta, 'bad_data_iterator': _bad_data_iterator}


@pytest.mark.parametrize('corruption', sorted(CORRUPTIONS))
def test_corrupt_latest_checkpoint_falls_back_with_a_warning(tmp_path, six_step_runs, corruption, caplog):
  workdir = str(tmp_path / 'run')
  shutil.copytree(six_step_runs['stopped'], workdir)
  CORRUPTIONS[corruption](os.path.join(workdir, 'checkpoints', '4'))
  config = train.resolve_vocab(six_step_runs['config'], _tokenizer(workdir))
  setup = state_lib.make_setup(config, devices=one_device())
  from effjax.data import pipeline  # pylint: disable=import-outside-toplevel
  bundle = pipeline.prepare_data(config.data, os.path.join(workdir, 'data'))
  iterator = pipeline.make_train_iterator(bundle.train_tokens, seq_len=32, batch_size=8, seed=0)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), 3)
  try:
    state, meta = train.restore_or_init(setup, config, ckpt, iterator, workdir)
  finally:
    ckpt.close()
  assert meta['step'] == 2 and int(state.step) == 2
  assert any('checkpoint step 4' in r.getMessage() and 'trying an older one' in r.getMessage()
             for r in caplog.records)
  assert any('moved unrestorable checkpoint step 4' in r.getMessage() for r in caplog.records)
  # the bad step is kept for inspection, out of the way of the next save
  assert checkpoint_steps(workdir) == [2] and os.path.isdir(os.path.join(workdir, 'checkpoints.corrupt', '4'))
  expected, _ = restore(six_step_runs['config'], six_step_runs['stopped'], step=2)
  assert_same_params(state, expected)


def test_fallback_then_resume_reproduces_the_uninterrupted_run(tmp_path, six_step_runs):
  workdir = str(tmp_path / 'run')
  shutil.copytree(six_step_runs['stopped'], workdir)
  _truncate(os.path.join(workdir, 'checkpoints', '4'))
  final_eval = train.train_and_evaluate(six_step_runs['config'], workdir, devices=one_device(), progress=False)
  assert final_eval == six_step_runs['final_eval']
  assert checkpoint_steps(workdir) == [2, 4, 6]  # step 4 written again (not silently skipped)
  for step in (4, 6):
    ours, _ = restore(six_step_runs['config'], workdir, step=step)
    theirs, _ = restore(six_step_runs['config'], six_step_runs['full'], step=step)
    assert_same_params(ours, theirs)
  # and the next start is clean: no warning loop, nothing else moved
  assert os.listdir(os.path.join(workdir, 'checkpoints.corrupt')) == ['4']


def test_all_checkpoints_unreadable_is_an_error_not_a_restart(tmp_path, six_step_runs):
  workdir = str(tmp_path / 'run')
  shutil.copytree(six_step_runs['stopped'], workdir)
  for step in (2, 4):
    _truncate(os.path.join(workdir, 'checkpoints', str(step)))
  before = snapshot(workdir)
  with pytest.raises(EffjaxError, match=r'no checkpoint in .* restores \(step 4: .*step 2: .*\); move .* aside') as e:
    train.train_and_evaluate(six_step_runs['config'], workdir, devices=one_device(), progress=False)
  assert '\n' not in str(e.value)
  assert snapshot(workdir) == before and not os.path.exists(os.path.join(workdir, 'checkpoints.corrupt'))


def test_interrupted_save_is_ignored(tmp_path, six_step_runs):
  """A crash during a save leaves orbax's temporary directory, never a step: the newest complete step wins."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(six_step_runs['stopped'], workdir)
  partial = os.path.join(workdir, 'checkpoints', '6.orbax-checkpoint-tmp-1234567')
  shutil.copytree(os.path.join(workdir, 'checkpoints', '4'), partial)
  _truncate(partial)
  state, meta = restore(six_step_runs['config'], workdir)
  assert meta['step'] == 4


# --------------------------------------------------------------------------------------------------------
# NaN / inf

def _inject(monkeypatch, bad_step: int, what: str):
  """Makes the jitted step return a non-finite loss (or non-finite params with a finite loss) at `bad_step`."""
  real = train.make_train_step

  def patched(setup, config):
    step_fn = real(setup, config)

    def wrapped(state, batch):
      new_state, metrics = step_fn(state, batch)
      if int(new_state.step) == bad_step:
        if what == 'loss':
          metrics = {**metrics, 'loss': metrics['loss'] * jnp.inf}
        else:
          new_state = new_state.replace(params=jax.tree.map(lambda x: x * jnp.nan, new_state.params))
      return new_state, metrics

    return wrapped

  monkeypatch.setattr(train, 'make_train_step', patched)


@pytest.mark.parametrize('what,bad_step,pattern,last_good', [
    ('loss', 5, r'loss became inf at step 5', 4),                  # detected at the next log boundary (6)
    ('params', 4, r'parameters became non-finite by step 4', 2),   # finite loss, diverged weights: not saved
])
def test_divergence_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, corpus_dir, monkeypatch,
                                                                           what, bad_step, pattern, last_good):
  _inject(monkeypatch, bad_step, what)
  workdir = str(tmp_path / 'run')
  config = tiny_config(corpus_dir, **{'train.steps': 8, 'train.log_every': 2, 'checkpoint.every': 2,
                                      'train.eval_every': 8})
  with pytest.raises(EffjaxError, match=pattern) as e:
    train.train_and_evaluate(config, workdir, devices=one_device(), progress=False)
  assert '\n' not in str(e.value)
  assert checkpoint_steps(workdir) == list(range(2, last_good + 1, 2))
  state, meta = restore(config, workdir)
  assert meta['step'] == last_good
  assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(state.params))


def test_huge_learning_rate_never_checkpoints_a_diverged_state(tmp_path, corpus_dir):
  config = tiny_config(corpus_dir, **{'train.steps': 20, 'train.lr': 1e6, 'train.grad_clip': 0.0,
                                      'train.warmup_steps': 0, 'train.log_every': 1, 'checkpoint.every': 1,
                                      'train.eval_every': 20})
  workdir = str(tmp_path / 'run')
  with pytest.raises(EffjaxError, match=r'(loss|gradient norm) became (nan|inf) at step (\d+)|non-finite') as e:
    train.train_and_evaluate(config, workdir, devices=one_device(), progress=False)
  steps = checkpoint_steps(workdir)
  import re  # pylint: disable=import-outside-toplevel
  match = re.search(r'step (\d+)', str(e.value))
  assert not steps or max(steps) < int(match.group(1))
  for step in steps:
    state, _ = restore(config, workdir, step=step)
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(state.params))
