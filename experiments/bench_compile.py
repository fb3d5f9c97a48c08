"""Compile time of shared vs independent and scanned vs unrolled layer stacks: `python -m experiments.bench_compile`.

The timed function is one training gradient (jax.value_and_grad of the loss w.r.t. all params) of a small GPT
(d_model 64, ctx 32, batch 4): small enough that compile time, not the model, dominates. For each stack we time
`jax.jit(f).lower(...)` (tracing + lowering to StableHLO) and `.compile()` (XLA) separately, after
`jax.clear_caches()`, in interleaved rounds (median), so that load from other processes hits every candidate
alike. The lowered module's size (characters of StableHLO text) is a machine-independent proxy.
Writes experiments/results/bench_compile.{json,md}.
"""

import json
import os
import pathlib
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from effjax.configs import efficio
from effjax.models import build_model

OUT = pathlib.Path(__file__).parent / 'results'
ROUNDS = 3
# name: (num_layers, share_layers, num_groups, scan_layers)
CASES = {
  'shared L=4 (scan)': (4, 'all', 1, True),
  'shared L=48 (scan)': (48, 'all', 1, True),
  'groups G=4 L=48 (scan)': (48, 'groups', 4, True),
  'independent L=4 (scan)': (4, 'none', 1, True),
  'independent L=48 (scan)': (48, 'none', 1, True),
  'independent L=4 (unrolled)': (4, 'none', 1, False),
  'independent L=48 (unrolled)': (48, 'none', 1, False),
  'shared L=48 (unrolled)': (48, 'all', 1, False),
}
RATIOS = {
  'shared scan: L=48 / L=4': ('shared L=48 (scan)', 'shared L=4 (scan)'),
  'independent scan: L=48 / L=4': ('independent L=48 (scan)', 'independent L=4 (scan)'),
  'unrolled: L=48 / L=4': ('independent L=48 (unrolled)', 'independent L=4 (unrolled)'),
  'L=48 independent: unrolled / scan': ('independent L=48 (unrolled)', 'independent L=48 (scan)'),
  'L=48 shared: unrolled / scan': ('shared L=48 (unrolled)', 'shared L=48 (scan)'),
  'L=48 scan: shared / independent': ('shared L=48 (scan)', 'independent L=48 (scan)'),
}


def model_config(layers: int, share: str, groups: int, scan: bool) -> ml_collections.ConfigDict:
  m = efficio.get_config('tiny').model
  m.update(num_layers=layers, share_layers=share, num_groups=groups, scan_layers=scan, vocab_size=256)
  return m


def grad_fn_and_args(m):
  model = build_model(m)
  tokens = jnp.zeros((4, 33), jnp.int32)
  params = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), tokens[:, :-1]))['params'])

  def loss(p, t):
    logits = model.apply({'params': p}, t[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, t[:, 1:]).mean()

  return jax.value_and_grad(loss), (params, jax.ShapeDtypeStruct(tokens.shape, tokens.dtype))


def time_compile(m) -> dict:
  jax.clear_caches()
  fn, args = grad_fn_and_args(m)
  t0 = time.perf_counter()
  lowered = jax.jit(fn).lower(*args)
  t1 = time.perf_counter()
  lowered.compile()
  t2 = time.perf_counter()
  return {'lower_s': t1 - t0, 'compile_s': t2 - t1, 'hlo_chars': len(lowered.as_text())}


def main():
  load_before = os.getloadavg()
  runs = {name: [] for name in CASES}
  for _ in range(ROUNDS):
    for name, case in CASES.items():
      runs[name].append(time_compile(model_config(*case)))
  load_after = os.getloadavg()
  rows = []
  for name, (layers, share, groups, scan) in CASES.items():
    med = {k: float(np.median([r[k] for r in runs[name]])) for k in ('lower_s', 'compile_s')}
    rows.append(
      dict(
        case=name,
        num_layers=layers,
        share_layers=share,
        num_groups=groups,
        scan=scan,
        **med,
        total_s=med['lower_s'] + med['compile_s'],
        hlo_chars=runs[name][0]['hlo_chars'],
      )
    )
  by = {r['case']: r for r in rows}
  ratios = {
    k: {
      'compile': by[a]['compile_s'] / by[b]['compile_s'],
      'lower+compile': by[a]['total_s'] / by[b]['total_s'],
      'hlo_size': by[a]['hlo_chars'] / by[b]['hlo_chars'],
    }
    for k, (a, b) in RATIOS.items()
  }
  meta = dict(
    jax=jax.__version__,
    device=str(jax.devices()[0]),
    cpus=os.cpu_count(),
    rounds=ROUNDS,
    loadavg_before=load_before,
    loadavg_after=load_after,
    model='d_model 64, 4 heads, ctx 32, batch 4, vocab 256, E=32 factorized; value_and_grad of the loss',
    note='median of interleaved rounds after jax.clear_caches(); shared 2-core CPU, other processes '
    'were running (see loadavg)',
  )
  lines = [
    '| stack | layers | lower (s) | compile (s) | lower+compile (s) | StableHLO chars |',
    '|---|---:|---:|---:|---:|---:|',
  ]
  lines += [
    f'| {r["case"]} | {r["num_layers"]} | {r["lower_s"]:.2f} | {r["compile_s"]:.2f} | {r["total_s"]:.2f} | '
    f'{r["hlo_chars"]:,} |'
    for r in rows
  ]
  lines += ['', '| ratio | compile | lower+compile | StableHLO size |', '|---|---:|---:|---:|']
  lines += [
    f'| {k} | {v["compile"]:.2f}x | {v["lower+compile"]:.2f}x | {v["hlo_size"]:.2f}x |' for k, v in ratios.items()
  ]
  lines += [
    '',
    f'jax {meta["jax"]} on {meta["device"]} ({meta["cpus"]} CPUs); {meta["model"]}; median of {ROUNDS} '
    f'interleaved rounds; load average before/after {load_before[0]:.2f}/{load_after[0]:.2f} '
    '(shared machine: other jobs were running).',
  ]
  md = '\n'.join(lines)
  print(md)
  OUT.mkdir(parents=True, exist_ok=True)
  (OUT / 'bench_compile.json').write_text(json.dumps(dict(meta=meta, rows=rows, ratios=ratios), indent=1))
  (OUT / 'bench_compile.md').write_text(md + '\n')


if __name__ == '__main__':
  main()
