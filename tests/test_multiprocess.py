"""Multi-process training: 2 local CPU processes x 4 devices (launch/local.py, jax.distributed over gloo) train
configs/gpt.py:tiny on a (data=2, fsdp=4) mesh, are SIGKILLed mid-run once a checkpoint exists, resume from it,
and give the losses of one process driving 8 devices (tol 1e-5).

What this exercises: jax.distributed.initialize from the --coordinator_address/--num_processes/--process_id
flags; data preparation by process 0 behind a barrier; grain's per-process slices of one global batch stream;
Orbax saving and restoring a state sharded across processes (and the per-process data-iterator state); metrics
written by process 0 only.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import pytest

from effjax import train
from tests.helpers import ROOT, tiny_config

if ROOT not in sys.path:  # `launch` is a top-level package of the checkout, not installed
  sys.path.insert(0, ROOT)
from launch.local import kill_all, start_local, wait_all  # noqa: E402  pylint: disable=wrong-import-position

pytestmark = pytest.mark.slow  # end-to-end: `make test-slow` and CI run it, `make test` does not

STEPS, EVERY = 24, 4
# steps+1 with stop_at: the run ends (checkpointed) at STEPS without the final evaluation, one compile less.
OVERRIDES = {
  'train.steps': STEPS + 1,
  'train.stop_at': STEPS,
  'train.log_every': 1,
  'train.eval_every': 1000,
  'checkpoint.every': EVERY,
  'checkpoint.keep': 10,
  'mesh.data': 2,
  'mesh.fsdp': 4,
}


def cli_args(workdir, corpus) -> list[str]:
  return [
    '--config=configs/gpt.py:tiny',
    f'--workdir={workdir}',
    f'--config.data.corpus={corpus}',
    '--progress=false',
    *(f'--config.{k}={v}' for k, v in OVERRIDES.items()),
  ]


def metric_lines(workdir) -> list[dict]:
  """metrics.jsonl, tolerating a line cut short by the SIGKILL."""
  out = []
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    for line in f:
      try:
        out.append(json.loads(line))
      except ValueError:
        pass
  return [m for m in out if m['split'] == 'train']


def finished_checkpoints(workdir) -> list[int]:
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def test_two_processes_killed_and_resumed_match_one_process(tmp_path, corpus_dir):
  workdir = str(tmp_path / 'mp')
  args = cli_args(workdir, corpus_dir)
  # The resumed run compiles the same programs as the killed one: a persistent compilation cache skips that.
  env = {
    'JAX_COMPILATION_CACHE_DIR': str(tmp_path / 'jax_cache'),
    'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
    'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0',
  }

  # 1. Start 2 processes; SIGKILL both mid-run, once a checkpoint is final and training has gone past it.
  procs = start_local(args, num_processes=2, devices_per_process=4, env=env, cwd=ROOT, sink=None)
  try:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and all(p.poll() is None for p in procs):
      done = finished_checkpoints(workdir)
      if (
        done
        and os.path.exists(os.path.join(workdir, 'metrics.jsonl'))
        and max(m['step'] for m in metric_lines(workdir) or [{'step': 0}]) > done[0]
      ):
        break
      time.sleep(0.02)
    running = [p.poll() is None for p in procs]
  finally:
    codes = kill_all(procs)
  output = '\n'.join(p.output[-3000:] for p in procs)
  assert all(running), f'a process ended before it could be killed (codes {codes}):\n{output}'
  assert codes == [-9, -9], output
  killed_at = max(m['step'] for m in metric_lines(workdir))
  saved = finished_checkpoints(workdir)
  assert saved and killed_at < STEPS, (saved, killed_at)

  # 2. Resume: the same command picks up the newest complete checkpoint and runs to the end.
  started = time.monotonic()
  procs = start_local(args, num_processes=2, devices_per_process=4, env=env, cwd=ROOT, sink=None)
  codes = wait_all(procs, timeout=300)
  print(f'resumed run: {time.monotonic() - started:.1f} s')
  output = '\n'.join(p.output[-3000:] for p in procs)
  assert codes == [0, 0], output
  resumed_from = [
    int(line.split('start at step ')[1].split()[0]) for line in procs[0].lines if 'start at step ' in line
  ]
  assert resumed_from and resumed_from[0] in saved and resumed_from[0] > 0, output

  # 3. One process driving all 8 devices, uninterrupted.
  reference = str(tmp_path / 'one')
  train.train_and_evaluate(tiny_config(corpus_dir, **OVERRIDES), reference, progress=False)
  want = {m['step']: m['loss'] for m in metric_lines(reference)}
  assert sorted(want) == list(range(1, STEPS + 1))

  lines = metric_lines(workdir)
  got = {m['step']: m['loss'] for m in lines}  # the resumed run's value wins for re-run steps
  assert sorted(got) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([got[s] for s in range(1, STEPS + 1)], [want[s] for s in range(1, STEPS + 1)], atol=1e-5)
  # Only process 0 logs: before the resume point every step was written exactly once.
  counts = {s: sum(m['step'] == s for m in lines) for s in range(1, resumed_from[0] + 1)}
  assert set(counts.values()) == {1}, counts
  # Process 0 prepared the dataset once; the other process read it after the barrier.
  assert os.path.exists(os.path.join(workdir, 'data', 'manifest.json'))


def test_two_processes_on_a_shared_prepared_dataset_read_it_and_match_one_process(tmp_path, corpus_dir):
  """data.dataset=DIR (made once by `python -m effjax.data.prepare`): both processes only read it (nothing is
  tokenized, no workdir gets a data/ cache) and give the losses of one process reading the same directory."""
  import subprocess  # pylint: disable=import-outside-toplevel

  shared = str(tmp_path / 'shared_ds')
  subprocess.run(
    [sys.executable, '-m', 'effjax.data.prepare', f'--corpus={corpus_dir}', f'--out={shared}', '--tokenizer=char'],
    cwd=ROOT,
    check=True,
    capture_output=True,
    timeout=300,
  )
  steps = 6
  over = {**OVERRIDES, 'train.steps': steps + 1, 'train.stop_at': steps, 'checkpoint.every': steps}
  workdir = str(tmp_path / 'mp')
  args = [
    '--config=configs/gpt.py:tiny',
    f'--workdir={workdir}',
    f'--config.data.dataset={shared}',
    '--progress=false',
    *(f'--config.{k}={v}' for k, v in over.items()),
  ]
  before = {n: os.path.getmtime(os.path.join(shared, n)) for n in os.listdir(shared)}
  procs = start_local(args, num_processes=2, devices_per_process=4, cwd=ROOT, sink=None)
  codes = wait_all(procs, timeout=300)
  output = '\n'.join(p.output[-3000:] for p in procs)
  assert codes == [0, 0], output
  assert not os.path.exists(os.path.join(workdir, 'data')), 'a process prepared data of its own'
  assert not any('prepared ' in line for p in procs for line in p.lines), output
  assert {n: os.path.getmtime(os.path.join(shared, n)) for n in os.listdir(shared)} == before

  reference = str(tmp_path / 'one')
  config = tiny_config(corpus_dir, **over)
  config.data.dataset = shared
  train.train_and_evaluate(config, reference, progress=False)
  want = {m['step']: m['loss'] for m in metric_lines(reference)}
  got = {m['step']: m['loss'] for m in metric_lines(workdir)}
  assert sorted(got) == sorted(want) == list(range(1, steps + 1))
  np.testing.assert_allclose([got[s] for s in sorted(want)], [want[s] for s in sorted(want)], atol=1e-5)
