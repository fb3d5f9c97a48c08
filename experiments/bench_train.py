"""Training throughput and MFU of effjax on this machine.

`python -m experiments.bench_train` times the jitted, sharded train step (the same one `train.py` runs) on
synthetic tokens and divides model FLOPs by the peak matmul FLOP/s measured in the same run, so the ratio does
not depend on a spec sheet. Model FLOPs = 3 x forward FLOPs per token (accounting.flops_per_token).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from effjax.configs import gpt as gpt_config
from effjax import accounting, state as state_lib, train

SIZES = {  # name: (layers, d_model, heads, seq_len, batch)
  '4L-128d-ctx64-b12': (4, 128, 4, 64, 12),
  '6L-384d-ctx256-b16': (6, 384, 6, 256, 16),
}


def peak_matmul_flops(n: int = 2048, repeats: int = 10, dtype=jnp.float32) -> float:
  """Best observed FLOP/s of a jitted n x n matmul: the denominator of MFU."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  f = jax.jit(lambda a, b: a @ b)
  f(a, b).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    t = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n**3 / best


def gpt_bench_config(layers, d_model, heads, seq_len, batch, **model_overrides):
  c = gpt_config.get_config()
  c.model.update(
    num_layers=layers, d_model=d_model, num_heads=heads, max_len=seq_len, vocab_size=256, **model_overrides
  )
  c.data.seq_len = seq_len
  c.train.batch_size = batch
  return c


def time_train_step(config, steps: int = 10, warmup: int = 3) -> dict:
  """Median step time of the real train step on random tokens; compile time measured separately."""
  setup = state_lib.make_setup(config, devices=jax.devices()[:1])
  state = setup.init_fn(jax.random.key(0))
  step_fn = train.make_train_step(setup, config)
  rng = np.random.default_rng(0)
  b, t, v = config.train.batch_size, config.data.seq_len, config.model.vocab_size
  tokens = rng.integers(0, v, size=(b, t + 1), dtype=np.int32)
  batch = jax.device_put({'inputs': tokens[:, :-1], 'targets': tokens[:, 1:]}, setup.batch_sharding)
  t0 = time.perf_counter()
  compiled = step_fn.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  for _ in range(warmup):
    state, m = compiled(state, batch)
  jax.block_until_ready(m)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, m = compiled(state, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  step_s = float(np.median(times))
  fwd = accounting.flops_per_token(config.model, t)
  tokens_per_s = b * t / step_s
  return {
    'step_ms': step_s * 1e3,
    'tokens_per_sec': tokens_per_s,
    'compile_s': compile_s,
    'model_flops_per_sec': 3 * fwd * tokens_per_s,
    'flops_per_token_fwd': fwd,
  }


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--out', default='experiments/results/bench_train')
  args = parser.parse_args(argv)
  peak = peak_matmul_flops()
  rows = []
  for name, (layers, d, h, s, b) in SIZES.items():
    r = time_train_step(gpt_bench_config(layers, d, h, s, b), steps=args.steps)
    r.update(name=name, mfu=r['model_flops_per_sec'] / peak)
    rows.append(r)
  lines = [
    f'peak jitted f32 matmul (2048^2): {peak / 1e9:.1f} GFLOP/s on {jax.devices()[0].device_kind}, '
    f'{os.cpu_count()} cores',
    '',
    '| config | step (ms) | tokens/s | model GFLOP/s | MFU | compile (s) |',
    '|---|---|---|---|---|---|',
  ]
  for r in rows:
    lines.append(
      f'| {r["name"]} | {r["step_ms"]:.1f} | {r["tokens_per_sec"]:,.0f} | '
      f'{r["model_flops_per_sec"] / 1e9:.1f} | {100 * r["mfu"]:.1f}% | {r["compile_s"]:.2f} |'
    )
  table = '\n'.join(lines)
  print(table)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out + '.json', 'w', encoding='utf-8') as f:
    json.dump({'peak_flops': peak, 'rows': rows}, f, indent=2)
  with open(args.out + '.md', 'w', encoding='utf-8') as f:
    f.write(table + '\n')
  return {'peak_flops': peak, 'rows': rows}


if __name__ == '__main__':
  main()
