"""Speed of the structured layers vs dense on this machine, with a roofline: `python -m experiments.bench_structured`.

FWHT (n = 1024, 4096; 1024 rows) vs `x @ H`, and AdaptiveFastFood / block-diagonal vs nn.Dense (1024 -> 4096,
6144; 4096 rows = batch x sequence; forward + backward = y and the grads w.r.t. params and input for a random
cotangent dy, as a training step needs them). Candidates of one comparison are timed in interleaved rounds
(median), so CPU contention from other processes hits them alike.

Roofline: the same run measures this machine's matmul peak (jitted f32 2048^2 matmul) and memory bandwidth (a
jitted `2x + 1` over 256 MiB: read + write). Each candidate's FLOPs and bytes are XLA's cost analysis of its
compiled program (every fused op's operands and result, i.e. the traffic if nothing stayed in cache), and its
bound is max(FLOPs / peak, bytes / bandwidth). A second, lower bound counts only the layer's interface in a
training step (x, params in; y; dy; dx and param grads out: no intermediate ever reaches memory), the physical
limit any implementation of the layer meets. The process runs with glibc huge pages, as the CLI sets for itself
(effjax/runtime.py).
"""

import contextlib
import functools
import json
import os
import pathlib
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from effjax import runtime
from effjax.models import structured as st

OUT = pathlib.Path(__file__).parent / 'results'
BATCH, ROWS, ROUNDS, WARMUP = 1024, 4096, 15, 2  # FWHT rows, layer rows (batch x sequence)
STREAM_MB, PEAK_N = 256, 2048


def fwht_radix2(x_BxN):
  """The plain recipe (12 radix-2 passes at n=4096), kept as a reference for the tuned st.fwht."""
  *lead, n = x_BxN.shape
  h = 1
  while h < n:
    y = x_BxN.reshape(*lead, n // (2 * h), 2, h)
    x_BxN = jnp.stack([y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]], -2).reshape(*lead, n)
    h *= 2
  return x_BxN


def time_side_by_side(cands: dict, stat=np.median) -> dict:
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
  return {name: (float(stat(wall[name])), float(stat(cpu[name]))) for name in cands}


def compiled_cost(fn, args) -> tuple[float, float]:
  """(FLOPs, bytes accessed) of fn's compiled program, from XLA's cost analysis (which counts a loop's body once:
  see untiled)."""
  cost = fn.lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost['flops']), float(cost['bytes accessed'])


@contextlib.contextmanager
def untiled():
  """Layers traced inside run on all rows at once: XLA's cost analysis counts a while loop's body once, so the
  row-tiled FastFood program (st._in_row_tiles) would be costed as one tile; untiled it is the same ops over all
  rows. Only the roofline's FLOPs and bytes come from it; the timed program is the tiled one."""
  tile = st.TILE_ELEMENTS
  st.TILE_ELEMENTS = 2**62
  try:
    yield
  finally:
    st.TILE_ELEMENTS = tile


def measure_machine() -> dict:
  """This machine's matmul peak (FLOP/s) and memory bandwidth (bytes/s, read + write): the fastest of the rounds,
  since a bound is what the machine can do, not what it did on average while shared."""
  x = jnp.ones((STREAM_MB * 2**20 // 4,), jnp.float32)
  a = jax.random.normal(jax.random.key(0), (PEAK_N, PEAK_N), jnp.float32)
  ms = time_side_by_side(
    {'stream': (jax.jit(lambda x: x * 2.0 + 1.0), (x,)), 'peak': (jax.jit(jnp.matmul), (a, a))}, stat=np.min
  )
  return dict(peak_flops=2 * PEAK_N**3 / (ms['peak'][0] / 1e3), bandwidth=2 * x.nbytes / (ms['stream'][0] / 1e3))


def with_roofline(row: dict, fn, args, interface_bytes: float, machine: dict) -> dict:
  """row + XLA's FLOPs and bytes for fn, the bound they give on this machine, and the interface-only bound."""
  flops, moved = compiled_cost(fn, args)
  bound_s = max(flops / machine['peak_flops'], moved / machine['bandwidth'])
  floor_s = max(row['flops_fwd_bwd'] / machine['peak_flops'], interface_bytes / machine['bandwidth'])
  return dict(
    row,
    compiled_flops=flops,
    compiled_bytes=moved,
    bound_ms=bound_s * 1e3,
    pct_of_bound=100 * bound_s * 1e3 / row['ms'],
    interface_bytes=interface_bytes,
    floor_ms=floor_s * 1e3,
  )


def bench_fwht(n: int, machine: dict) -> list[dict]:
  x_BxN = jax.random.normal(jax.random.key(0), (BATCH, n))
  h_NxN = jnp.asarray(scipy.linalg.hadamard(n), jnp.float32)
  np.testing.assert_allclose(jax.jit(st.fwht)(x_BxN), x_BxN @ h_NxN, rtol=1e-4, atol=1e-2)
  cands = {
    'dense x @ H': (jax.jit(jnp.matmul), (x_BxN, h_NxN)),
    'fwht radix-2 (reference)': (jax.jit(fwht_radix2), (x_BxN,)),
    'fwht (effjax)': (jax.jit(st.fwht), (x_BxN,)),
  }
  ms = time_side_by_side(cands)
  flops = {'dense x @ H': 2 * BATCH * n * n}
  flops['fwht radix-2 (reference)'] = flops['fwht (effjax)'] = BATCH * n * int(np.log2(n))
  rows = []
  for k, v in ms.items():
    row = dict(
      bench='fwht fwd',
      shape=f'{BATCH}x{n}',
      impl=k,
      ms=v[0],
      cpu_ms=v[1],
      params=n * n if k.startswith('dense') else 0,
      flops=flops[k],
      flops_fwd_bwd=flops[k],  # forward only here
      speedup=ms['dense x @ H'][0] / v[0],
      cpu_speedup=ms['dense x @ H'][1] / v[1],
    )
    rows.append(with_roofline(row, *cands[k], interface_bytes=2 * x_BxN.nbytes, machine=machine))
  return rows


def fwd_bwd(layer, rest, params, x_BxI, dy_BxO):
  """What a training step asks of a layer: y, and the grads w.r.t. params and x for a cotangent dy. (The grad of a
  sum would let XLA drop the forward matmul, unused, and turn the weight gradient against ones into a reduction.)"""
  y_BxO, vjp = jax.vjp(lambda p, x: layer.apply({'params': p, **rest}, x), params, x_BxI)
  return y_BxO, vjp(dy_BxO)


def bench_layer(d_in: int, d_out: int, machine: dict) -> list[dict]:
  x_BxI = jax.random.normal(jax.random.key(0), (ROWS, d_in))
  layers = {
    'dense': nn.Dense(d_out),
    'fastfood': st.AdaptiveFastFood(d_out),
    'blockdiag': st.make_dense('blockdiag')(features=d_out),
  }
  dy_BxO = jax.random.normal(jax.random.key(2), (ROWS, d_out))
  cands, rests = {}, {}
  for kind, layer in layers.items():
    variables = nn.unbox(layer.init(jax.random.key(1), x_BxI))
    params, rests[kind] = variables['params'], {k: v for k, v in variables.items() if k != 'params'}
    cands[kind] = (jax.jit(functools.partial(fwd_bwd, layer, rests[kind])), (params, x_BxI, dy_BxO))
    assert sum(p.size for p in jax.tree.leaves(params)) == st.dense_params(kind, d_in, d_out)
  ms = time_side_by_side(cands)
  rows = []
  for k, v in ms.items():
    fwd = ROWS * st.dense_flops(k, d_in, d_out)
    row = dict(
      bench='layer fwd+bwd',
      shape=f'{ROWS}x{d_in}->{d_out}',
      impl=k,
      ms=v[0],
      cpu_ms=v[1],
      params=st.dense_params(k, d_in, d_out),
      flops=fwd,
      flops_fwd_bwd=3 * fwd,  # forward + grads w.r.t. input and params
      speedup=ms['dense'][0] / v[0],
      cpu_speedup=ms['dense'][1] / v[1],
    )
    # a training step's interface: x and params in, y out; dy in, dx and param grads out (f32)
    interface = 4 * (2 * ROWS * d_in + 2 * ROWS * d_out + 2 * row['params'])
    with untiled():  # a fresh jit: traced again with the tiles off
      costed = jax.jit(functools.partial(fwd_bwd, layers[k], rests[k]))
      rows.append(with_roofline(row, costed, cands[k][1], interface_bytes=interface, machine=machine))
  return rows


def targets_of(rows: list[dict]) -> dict:
  get = {(r['bench'], r['shape'], r['impl']): r for r in rows}
  fwht = get[('fwht fwd', f'{BATCH}x4096', 'fwht (effjax)')]
  dense, ff, bd = (get[('layer fwd+bwd', f'{ROWS}x1024->6144', k)] for k in ('dense', 'fastfood', 'blockdiag'))
  return {
    'fwht >= 10x dense at n=4096': fwht['speedup'] >= 10,
    'fastfood >= 3x dense at 1024->6144': ff['speedup'] >= 3,
    'blockdiag >= its FLOP ratio vs dense at 1024->6144': bd['speedup'] >= dense['flops'] / bd['flops'],
    'the physical limit allows fastfood 3x (dense measured / fastfood interface bound >= 3)': (
      dense['ms'] / ff['floor_ms'] >= 3
    ),
  }


def markdown(rows: list[dict], meta: dict) -> str:
  m = meta['machine']
  lines = [
    '| benchmark | shape | impl | wall ms (median) | CPU ms | params | GFLOP (compiled) | MB moved (compiled) | '
    'roofline bound ms | % of bound | interface bound ms | speedup vs dense (wall / CPU) |',
    '|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|',
  ]
  lines += [
    f'| {r["bench"]} | {r["shape"]} | {r["impl"]} | {r["ms"]:.2f} | {r["cpu_ms"]:.1f} | {r["params"]:,} | '
    f'{r["compiled_flops"] / 1e9:.3g} | {r["compiled_bytes"] / 1e6:,.0f} | {r["bound_ms"]:.2f} | '
    f'{r["pct_of_bound"]:.0f}% | {r["floor_ms"]:.2f} | {r["speedup"]:.1f}x / {r["cpu_speedup"]:.1f}x |'
    for r in rows
  ]
  lines += [
    '',
    f'jax {meta["jax"]} on {meta["device"]} ({meta["cpus"]} CPUs, {meta["cpu"]}); FWHT on {BATCH} rows, layers on '
    f'{ROWS} rows; median of {ROUNDS} interleaved rounds; load average before/after '
    f'{meta["loadavg_before"][0]:.2f}/{meta["loadavg_after"][0]:.2f}; GLIBC_TUNABLES={meta["glibc_tunables"]}; '
    f'transparent huge pages {meta.get("thp")}; {meta.get("glibc")}.',
    f'Measured in this run (fastest round): matmul peak {m["peak_flops"] / 1e9:.1f} GFLOP/s, memory bandwidth '
    f'{m["bandwidth"] / 1e9:.1f} GB/s (read + write). Roofline bound = max(FLOPs / peak, bytes / bandwidth) of '
    "the compiled program; % of bound = bound / measured; interface bound = the same with only the layer's "
    'training-step inputs and outputs moved and its algorithmic FLOPs (fwd + bwd).',
    'Targets (wall): ' + ', '.join(f'{k}: {"met" if v else "NOT met"}' for k, v in meta['targets_met'].items()),
  ]
  return '\n'.join(lines)


def main():
  runtime.reexec_with_hugepages()  # as the CLI does for itself; glibc reads it at process start
  load_before = os.getloadavg()
  machine = measure_machine()
  rows = (
    bench_fwht(1024, machine)
    + bench_fwht(4096, machine)
    + bench_layer(1024, 4096, machine)
    + bench_layer(1024, 6144, machine)
  )
  load_after = os.getloadavg()
  from experiments import bench  # pylint: disable=import-outside-toplevel

  meta = dict(
    jax=jax.__version__,
    glibc_tunables=os.environ.get('GLIBC_TUNABLES', '(unset)'),
    device=str(jax.devices()[0]),
    cpus=os.cpu_count(),
    **{k: v for k, v in bench.machine().items() if k in ('cpu', 'thp', 'glibc')},  # what the figures depend on
    batch=BATCH,
    rows=ROWS,
    rounds=ROUNDS,
    machine=machine,
    loadavg_before=load_before,
    loadavg_after=load_after,
    targets_met=targets_of(rows),
    note='flops: forward, algorithmic (Hadamard = n log2 n adds), per call; compiled_*: XLA cost analysis.',
  )
  md = markdown(rows, meta)
  print(md)
  OUT.mkdir(parents=True, exist_ok=True)
  (OUT / 'bench_structured.json').write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
  (OUT / 'bench_structured.md').write_text(md + '\n')


if __name__ == '__main__':
  main()
