"""Speed of the structured layers vs dense on this machine: `python -m experiments.bench_structured`.

FWHT (n = 1024, 4096; batch 1024) vs `x @ H`, and AdaptiveFastFood / block-diagonal vs nn.Dense (1024 -> 4096,
6144; 1024 tokens; forward + backward = jax.grad of a sum w.r.t. params and input). Candidates of one comparison
are timed in interleaved rounds (median), so CPU contention from other processes hits them alike.
"""

import json
import os
import pathlib
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from effjax.models import structured as st

OUT = pathlib.Path(__file__).parent / 'results'
BATCH, ROUNDS, WARMUP = 1024, 15, 2


def fwht_radix2(x_BxN):
  """The plain recipe (12 radix-2 passes at n=4096), kept as a reference for the tuned st.fwht."""
  *lead, n = x_BxN.shape
  h = 1
  while h < n:
    y = x_BxN.reshape(*lead, n // (2 * h), 2, h)
    x_BxN = jnp.stack([y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]], -2).reshape(*lead, n)
    h *= 2
  return x_BxN


def time_side_by_side(cands: dict) -> dict:
  """cands: name -> (jitted fn, args). Median wall ms and process CPU ms (all threads, user + sys) per call
  over interleaved rounds after warm-up; CPU time is less distorted than wall time when others load the CPU."""
  for fn, args in cands.values():
    for _ in range(WARMUP):
      jax.block_until_ready(fn(*args))
  wall, cpu = {name: [] for name in cands}, {name: [] for name in cands}
  for _ in range(ROUNDS):
    for name, (fn, args) in cands.items():
      t0, c0 = time.perf_counter(), time.process_time()
      jax.block_until_ready(fn(*args))
      wall[name].append((time.perf_counter() - t0) * 1e3)
      cpu[name].append((time.process_time() - c0) * 1e3)
  return {name: (float(np.median(wall[name])), float(np.median(cpu[name]))) for name in cands}


def bench_fwht(n: int) -> list[dict]:
  x_BxN = jax.random.normal(jax.random.key(0), (BATCH, n))
  h_NxN = jnp.asarray(scipy.linalg.hadamard(n), jnp.float32)
  np.testing.assert_allclose(jax.jit(st.fwht)(x_BxN), x_BxN @ h_NxN, rtol=1e-4, atol=1e-2)
  ms = time_side_by_side(
    {
      'dense x @ H': (jax.jit(jnp.matmul), (x_BxN, h_NxN)),
      'fwht radix-2 (reference)': (jax.jit(fwht_radix2), (x_BxN,)),
      'fwht (effjax)': (jax.jit(st.fwht), (x_BxN,)),
    }
  )
  flops = {'dense x @ H': 2 * BATCH * n * n}
  flops['fwht radix-2 (reference)'] = flops['fwht (effjax)'] = BATCH * n * int(np.log2(n))
  return [
    dict(
      bench='fwht fwd',
      shape=f'{BATCH}x{n}',
      impl=k,
      ms=v[0],
      cpu_ms=v[1],
      params=n * n if k.startswith('dense') else 0,
      flops=flops[k],
      speedup=ms['dense x @ H'][0] / v[0],
      cpu_speedup=ms['dense x @ H'][1] / v[1],
    )
    for k, v in ms.items()
  ]


def bench_layer(d_in: int, d_out: int) -> list[dict]:
  x_BxI = jax.random.normal(jax.random.key(0), (BATCH, d_in))
  layers = {
    'dense': nn.Dense(d_out),
    'fastfood': st.AdaptiveFastFood(d_out),
    'blockdiag': st.make_dense('blockdiag')(features=d_out),
  }
  cands = {}
  for kind, layer in layers.items():
    variables = nn.unbox(layer.init(jax.random.key(1), x_BxI))
    params, rest = variables['params'], {k: v for k, v in variables.items() if k != 'params'}
    loss = lambda p, x, layer=layer, rest=rest: jnp.sum(layer.apply({'params': p, **rest}, x))
    cands[kind] = (jax.jit(jax.grad(loss, argnums=(0, 1))), (params, x_BxI))
    assert sum(p.size for p in jax.tree.leaves(params)) == st.dense_params(kind, d_in, d_out)
  ms = time_side_by_side(cands)
  return [
    dict(
      bench='layer fwd+bwd',
      shape=f'{BATCH}x{d_in}->{d_out}',
      impl=k,
      ms=v[0],
      cpu_ms=v[1],
      params=st.dense_params(k, d_in, d_out),
      flops=BATCH * st.dense_flops(k, d_in, d_out),
      speedup=ms['dense'][0] / v[0],
      cpu_speedup=ms['dense'][1] / v[1],
    )
    for k, v in ms.items()
  ]


def main():
  load_before = os.getloadavg()
  rows = bench_fwht(1024) + bench_fwht(4096) + bench_layer(1024, 4096) + bench_layer(1024, 6144)
  load_after = os.getloadavg()
  get = lambda b, s, i: next(r['speedup'] for r in rows if r['bench'] == b and r['shape'] == s and r['impl'] == i)
  targets = {
    'fwht >= 10x dense at n=4096': get('fwht fwd', f'{BATCH}x4096', 'fwht (effjax)') >= 10,
    'fastfood >= 3x dense at 1024->6144': get('layer fwd+bwd', f'{BATCH}x1024->6144', 'fastfood') >= 3,
  }
  malloc_env = {k: v for k, v in os.environ.items() if k.startswith('MALLOC_')}
  meta = dict(
    jax=jax.__version__,
    malloc_env=malloc_env,
    device=str(jax.devices()[0]),
    cpus=os.cpu_count(),
    batch=BATCH,
    rounds=ROUNDS,
    loadavg_before=load_before,
    loadavg_after=load_after,
    targets_met=targets,
    note='FLOPs: forward, algorithmic (Hadamard = n log2 n adds), per call; shared CPU, other '
    'processes may have been running (see loadavg).',
  )
  lines = [
    '| benchmark | shape | impl | wall ms (median) | CPU ms | params | fwd FLOPs | speedup vs dense (wall / CPU) |',
    '|---|---|---|---:|---:|---:|---:|---:|',
  ]
  lines += [
    f'| {r["bench"]} | {r["shape"]} | {r["impl"]} | {r["ms"]:.2f} | {r["cpu_ms"]:.1f} | {r["params"]:,} | '
    f'{r["flops"]:.3g} | {r["speedup"]:.1f}x / {r["cpu_speedup"]:.1f}x |'
    for r in rows
  ]
  lines += [
    '',
    f'jax {meta["jax"]} on {meta["device"]} ({meta["cpus"]} CPUs), batch {BATCH}, median of {ROUNDS} '
    f'interleaved rounds; load average before/after {load_before[0]:.2f}/{load_after[0]:.2f}.',
    f'glibc malloc env: {malloc_env or "default"}.',
    'Targets (wall): ' + ', '.join(f'{k}: {"met" if v else "NOT met"}' for k, v in targets.items()),
  ]
  md = '\n'.join(lines)
  print(md)
  OUT.mkdir(parents=True, exist_ok=True)
  (OUT / 'bench_structured.json').write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
  (OUT / 'bench_structured.md').write_text(md + '\n')


if __name__ == '__main__':
  main()
