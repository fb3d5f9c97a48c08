"""Step-time jitter around checkpoint saves: does an Orbax save stall training?

`python -m experiments.bench_ckpt_jitter [--dir DIR] [--steps 60] [--every 10]` runs the jitted train step of the
default gpt config (train.py's own step and Checkpointer, synthetic tokens) and saves every `--every` steps into DIR
(a temporary directory by default; gs://... works too). It prints one JSON line: how long each `save()` call blocked
the loop, the median step time away from saves, the step times of the 3 steps after each save, and the final
wait for the last save. Saves are asynchronous (Orbax's CheckpointManager default), so what a save costs the loop is
the blocking part; on a CPU the background write also competes with the step for the same cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import jax
import numpy as np


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--dir', default='')
  p.add_argument('--steps', type=int, default=60)
  p.add_argument('--every', type=int, default=10)
  p.add_argument('--preset', default='')
  a = p.parse_args()

  from effjax import checkpoint, state as state_lib, train  # pylint: disable=import-outside-toplevel
  from effjax.configs import gpt  # pylint: disable=import-outside-toplevel

  config = gpt.get_config(a.preset)
  config.model.vocab_size = 256
  setup = state_lib.make_setup(config, devices=jax.devices()[:1])
  state = setup.init_fn(jax.random.key(0))
  step_fn = train.make_train_step(setup, config)
  rng = np.random.default_rng(0)
  b, t = config.train.batch_size, config.data.seq_len

  def batch():
    w = rng.integers(0, 256, (b, t + 1), dtype=np.int32)
    return train._shard(setup, {'inputs': w[:, :-1], 'targets': w[:, 1:]})  # pylint: disable=protected-access

  directory = a.dir or os.path.join(tempfile.mkdtemp(prefix='effjax_jitter_'), 'checkpoints')
  ckpt = checkpoint.Checkpointer(directory, keep=2)
  state, m = step_fn(state, batch())  # compile
  jax.block_until_ready(m['loss'])
  step_times, save_times, saved_at = [], [], []
  for step in range(1, a.steps + 1):
    x = batch()
    start = time.perf_counter()
    state, m = step_fn(state, x)
    jax.block_until_ready(m['loss'])
    step_times.append(time.perf_counter() - start)
    if step % a.every == 0:
      start = time.perf_counter()
      ckpt.save(step, state, None, {'step': step})
      save_times.append(time.perf_counter() - start)
      saved_at.append(step)
  start = time.perf_counter()
  ckpt.close()
  final_wait = time.perf_counter() - start
  after = {s + k for s in saved_at for k in (1, 2, 3) if s + k <= a.steps}
  away = [dt for i, dt in enumerate(step_times, 1) if i not in after]
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  print(
    json.dumps(
      {
        'preset': a.preset or 'default',
        'state_mb': round(state_bytes / 2**20, 1),
        'dir': directory,
        'load_avg': [round(x, 2) for x in os.getloadavg()],
        'steps': a.steps,
        'every': a.every,
        'save_call_ms': [round(1000 * s, 1) for s in save_times],
        'median_step_ms_away_from_saves': round(1000 * statistics.median(away), 1),
        'step_ms_after_each_save': [
          [round(1000 * step_times[s + k - 1], 1) for k in (1, 2, 3) if s + k <= a.steps] for s in saved_at
        ],
        'final_wait_ms': round(1000 * final_wait, 1),
      }
    )
  )


if __name__ == '__main__':
  main()
