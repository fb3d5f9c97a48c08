"""Soak test: train `gpt:tiny`, kill it at random points (SIGTERM or SIGKILL; during setup, mid-step or
mid-save), resume, `--cycles` times in a row, and check that the final losses equal an uninterrupted run's.

    python experiments/soak.py --cycles=50 [--root=/tmp/soak] [--seed=0]

Not part of the test suite (it takes many minutes): every cycle is a real CLI process. Prints one line per
cycle and a final JSON summary; exits 1 if any loss differs, a run ended with an unexpected exit code, or its
stderr held a traceback.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREEMPTED = 75


def make_corpus(directory: str) -> str:
  os.makedirs(directory, exist_ok=True)
  for i in range(24):
    lines = [
      f'def function_{i}_{j}(x, y={j}):\n    """Return x plus {j}."""\n    return x + y * {i}\n\n' for j in range(40)
    ]
    with open(os.path.join(directory, f'module_{i:02d}.py'), 'w', encoding='utf-8') as f:
      f.write(''.join(lines))
  return directory


def command(workdir: str, corpus: str, steps: int) -> list[str]:
  return [
    sys.executable,
    '-m',
    'effjax.main',
    '--config=configs/gpt.py:tiny',
    f'--workdir={workdir}',
    f'--config.data.corpus={corpus}',
    f'--config.train.steps={steps}',
    '--config.train.log_every=1',
    '--config.train.eval_every=100000',
    '--config.checkpoint.every=4',
    '--progress=false',
  ]


def env(cache_dir: str = '') -> dict:
  """One CPU device; with `cache_dir` a persistent compilation cache, so each resume loads the compiled steps
  instead of compiling them again (the same executables: the losses do not change)."""
  out = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}
  if cache_dir:
    out.update(
      JAX_COMPILATION_CACHE_DIR=cache_dir,
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='-1',
    )
  return out


def train_losses(workdir: str) -> dict:
  """step -> loss; a step re-run after a kill replaces its earlier line."""
  out = {}
  path = os.path.join(workdir, 'metrics.jsonl')
  if os.path.exists(path):
    with open(path, encoding='utf-8') as f:
      for line in f:
        try:
          record = json.loads(line)
        except json.JSONDecodeError:
          continue
        if record.get('split') == 'train':
          out[record['step']] = record['loss']
  return out


def handlers_installed(pid: int) -> bool:
  """Whether the process catches SIGTERM yet (effjax installs its handler as training starts)."""
  try:
    with open(f'/proc/{pid}/status', encoding='utf-8') as f:
      caught = next(int(line.split()[1], 16) for line in f if line.startswith('SigCgt:'))
  except (OSError, StopIteration):
    return False
  return bool(caught & (1 << (signal.SIGTERM - 1)))


def wait_until(predicate, proc, timeout: float) -> bool:
  deadline = time.time() + timeout
  while time.time() < deadline:
    if proc.poll() is not None:
      return False
    if predicate():
      return True
    time.sleep(0.01)
  return False


def one_cycle(rng: random.Random, workdir: str, args: list[str], log_dir: str, n: int, run_env: dict) -> dict:
  """Starts the run, kills it at a random point of a random phase, returns what happened."""
  phase = rng.choice(['setup', 'mid_step', 'mid_step', 'mid_save'])
  sig = rng.choice([signal.SIGTERM, signal.SIGKILL])
  done = max(train_losses(workdir), default=0)
  err_path = os.path.join(log_dir, f'cycle{n:03d}.stderr')
  with open(err_path, 'w', encoding='utf-8') as err:
    proc = subprocess.Popen(args, cwd=ROOT, env=run_env, stdout=subprocess.DEVNULL, stderr=err)
    hit = False
    try:
      if phase == 'setup':
        hit = wait_until(lambda: handlers_installed(proc.pid), proc, 600)
        time.sleep(rng.uniform(0, 1.5))
      elif phase == 'mid_step':
        target = done + rng.randint(1, 6)
        hit = wait_until(lambda: max(train_losses(workdir), default=0) >= target, proc, 600)
      else:  # a temporary step directory of this run (not one a killed run left behind)
        saves = lambda: set(glob.glob(os.path.join(workdir, 'checkpoints', '*.orbax-checkpoint-tmp*')))
        leftover = saves()
        hit = wait_until(lambda: handlers_installed(proc.pid) and bool(saves() - leftover), proc, 600)
      if proc.poll() is None:
        proc.send_signal(sig)
      proc.wait(timeout=600)
    finally:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  with open(err_path, encoding='utf-8') as f:
    stderr = f.read()
  expected = {0, PREEMPTED} if sig == signal.SIGTERM else {0, -signal.SIGKILL}
  return {
    'cycle': n,
    'phase': phase,
    'signal': signal.Signals(sig).name,
    'hit': hit,
    'rc': proc.returncode,
    'ok': proc.returncode in expected and 'Traceback' not in stderr,
    'step': max(train_losses(workdir), default=0),
  }


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--cycles', type=int, default=50)
  parser.add_argument('--steps', type=int, default=160)
  parser.add_argument('--root', default='/tmp/effjax_soak')
  parser.add_argument('--seed', type=int, default=0)
  a = parser.parse_args()
  shutil.rmtree(a.root, ignore_errors=True)
  reference, soaked, logs = (os.path.join(a.root, d) for d in ('reference', 'soaked', 'logs'))
  os.makedirs(logs)
  corpus = make_corpus(os.path.join(a.root, 'corpus'))
  t0 = time.time()
  ref = subprocess.run(
    command(reference, corpus, a.steps), cwd=ROOT, env=env(), capture_output=True, text=True, check=False
  )
  if ref.returncode != 0:
    print(ref.stderr[-3000:])
    return 1
  rng = random.Random(a.seed)
  cached = env(os.path.join(a.root, 'jax_cache'))
  results = []
  for n in range(1, a.cycles + 1):
    if max(train_losses(soaked), default=0) >= a.steps:
      break  # finished before all cycles: the run was too short for the kills
    results.append(one_cycle(rng, soaked, command(soaked, corpus, a.steps), logs, n, cached))
    print(json.dumps(results[-1]), flush=True)
  final = subprocess.run(
    command(soaked, corpus, a.steps), cwd=ROOT, env=cached, capture_output=True, text=True, check=False
  )
  want, got = train_losses(reference), train_losses(soaked)
  diffs = [abs(want[s] - got.get(s, float('nan'))) for s in want]
  summary = {
    'cycles': len(results),
    'kills_landed': sum(r['rc'] not in (0,) for r in results),
    'by_phase': {p: sum(r['phase'] == p for r in results) for p in ('setup', 'mid_step', 'mid_save')},
    'by_signal': {s: sum(r['signal'] == s for r in results) for s in ('SIGTERM', 'SIGKILL')},
    'unexpected': [r for r in results if not r['ok']],
    'final_rc': final.returncode,
    'steps_compared': len(want),
    'losses_equal': all(d == 0.0 for d in diffs),
    'max_abs_loss_diff': max(diffs) if diffs else None,
    'seconds': round(time.time() - t0),
  }
  print(json.dumps(summary))
  ok = (
    final.returncode == 0
    and len(results) == a.cycles
    and not summary['unexpected']
    and sorted(got) == sorted(want)
    and max(diffs) <= 1e-5 * max(abs(v) for v in want.values())
  )
  return 0 if ok else 1


if __name__ == '__main__':
  sys.exit(main())
