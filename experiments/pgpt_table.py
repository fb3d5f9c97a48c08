"""The p-gpt / lc-gpt / cc-gpt table of arXiv 2404.14462, ours beside the paper's: `python -m experiments.pgpt_table`.

Every model is its family's paper architecture (post-LN blocks, learned positions, biases, untied head with bias;
configs/{gpt.py:paper_pgpt_baseline, pgpt.py, lcgpt.py, ccgpt.py}) shrunk to one CPU scale, trained with the
standard `train.train_and_evaluate` for the same steps; `--seeds 0,1,2` repeats everything per seed (config.seed
sets the init and the data order; within a seed every model sees the same batches). The parameter columns of the
paper's scale come from `--mode=summary` of the paper presets (no training).
p-gpt-1 is the trained p-gpt evaluated with one active branch. Today's p-gpt (softmax mix, final norm after the mix)
renormalises the weights (the branch alone, weight 1). 'p-gpt (published)' is the authors' paper-era architecture
(configs/pgpt.py:published: one scalar weight, no norm after the mix); its p-gpt-1 is the authors' rule, the branch
whose trained weight is >= 0.5 scaled by that weight (parallel.strongest_branch); the same branch at weight 1 is
reported too (`val_loss_p_gpt_1_unscaled`). We report every branch and the one with the larger learned weight.

It also measures the p-gpt branch stack vectorised (nn.vmap, one stack with a 'branch' axis) against the same
network as a Python loop over separately named stacks: jitted AdamW train steps, interleaved, median of N
(`--bench_repeats 0` skips it: timings on a shared machine are not figures).

Writes experiments/results/pgpt_table.{md,json} and pgpt_loss_curves.png.
"""

import argparse
import json
import os
import pathlib
import shlex
import shutil
import tempfile
import sys
import time

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax

from effjax.configs import ccgpt, gpt as gpt_config, lcgpt, pgpt
from effjax import accounting, metrics, modes, train
from effjax.data import pipeline
from effjax.models import build_model, parallel
from experiments import provenance

OUT = pathlib.Path(__file__).parent / 'results'
# One CPU scale for every model: widths 128 (lc/cc: 128 → 64 → 32), 4 heads, 4 blocks, ctx 64, batch 16.
SCALE = {
  'model': dict(d_model=128, num_heads=4, num_layers=4, max_len=64, dropout=0.0, vocab_size=0),
  'data': dict(corpus='embedded', tokenizer='char', seq_len=64, max_bytes=2_000_000),
  'train': dict(
    batch_size=16,
    lr=2e-3,
    lr_schedule='cosine',
    warmup_steps=50,
    weight_decay=0.1,
    log_every=25,
    eval_every=100,
    eval_batches=8,
  ),
}
# The paper's table (GPU, 10k iterations at d 384 / ctx 256 / batch 64) and its code's final validation losses.
PAPER = {
  'gpt': dict(params='8.82 M', mb=33.66, minutes=25.35, val_loss=0.9105),
  'p-gpt': dict(params='-', mb=None, minutes=None, val_loss=0.9489),
  'p-gpt-1': dict(params='6.19 M', mb=23.60, minutes=26.15, val_loss=1.4901),
  'lc-gpt': dict(params='5.65 M', mb=21.54, minutes=20.68, val_loss=0.9432),
  'cc-gpt': dict(params='5.65 M', mb=21.54, minutes=21.68, val_loss=0.9505),
}
# label: (config module, preset, extra model overrides, the paper preset whose summary we quote)
RUNS = {
  'gpt': (gpt_config, 'paper_pgpt_baseline', {}, (gpt_config, 'paper_pgpt_baseline')),
  'p-gpt': (pgpt, '', {}, (pgpt, 'paper')),
  'p-gpt (published)': (pgpt, 'published', {}, (pgpt, 'published')),
  'lc-gpt': (lcgpt, '', {}, (lcgpt, 'paper')),
  'cc-gpt': (ccgpt, '', {}, (ccgpt, 'paper')),
}
EXTRAS = {  # with --extras
  'p-gpt (project form)': (pgpt, 'project', {}, None),
  'cc-gpt (kernel 3)': (ccgpt, 'k3', {}, None),
}


def make_config(module, preset: str, overrides: dict, steps: int, seed: int = 0):
  c = module.get_config(preset)
  for section, values in SCALE.items():
    c[section].update(values)
  c.model.update(overrides)
  c.train.update(steps=steps)
  c.seed = seed
  c.checkpoint.every = steps
  return c


def paper_summary(spec) -> dict:
  if spec is None:
    return {}
  module, preset = spec
  s = accounting.summarize(module.get_config(preset))
  keep = ('total_params', 'param_mb', 'single_branch_params', 'single_branch_param_mb')
  return {k: s[k] for k in keep if k in s}


def run_one(label, config, data_cache, root) -> dict:
  name = label.replace(' ', '_').replace('(', '').replace(')', '')
  workdir = os.path.join(root, f'{name}_seed{config.seed}')
  shutil.copytree(data_cache, os.path.join(workdir, 'data'))  # tokenize once for every run
  t0 = time.time()
  result = train.train_and_evaluate(config, workdir, progress=False)
  wall = time.time() - t0
  lines = metrics.read_metrics(workdir)
  train_lines = [m for m in lines if m['split'] == 'train']
  with open(os.path.join(workdir, 'summary.json'), encoding='utf-8') as f:
    summary = json.load(f)
  row = {
    'label': label,
    'seed': int(config.seed),
    'family': config.model.family,
    'total_params': summary['total_params'],
    'param_mb': summary['param_mb'],
    'flops_per_token': summary['flops_per_token'],
    'final_val_loss': result['loss'],
    'wall_s': wall,
    'tokens_per_sec': float(np.median([t['tokens_per_sec'] for t in train_lines[1:]])),
    'train_curve': [(t['step'], t['loss']) for t in train_lines],
    'val_curve': [(e['step'], e['loss']) for e in lines if e['split'] == 'eval'],
  }
  if config.model.family == 'pgpt':
    row.update(single_branch(config, workdir, summary))
  return row


def single_branch(config, workdir, summary) -> dict:
  """The trained p-gpt with one active branch on the same validation batches: renormalised to weight 1 (softmax
  mix), or (scalar mix, the authors' code) scaled by its trained weight, plus that branch at weight 1."""
  out = {'single_branch_params': summary['single_branch_params']}
  setup, state, config, _, _ = modes.restore_trained(config, workdir)  # config now has the vocabulary
  one = ml_collections.ConfigDict(config.model.to_dict())
  one.pgpt.active_branches = (0,)
  out['single_branch_flops_per_token'] = accounting.flops_per_token(one, config.data.seq_len)
  bundle, _ = train.load_data(config, workdir)
  from effjax import sharding  # pylint: disable=import-outside-toplevel

  divisor = sharding.batch_divisor(setup.mesh, setup.rules)
  batches = [
    train.eval_rows(b, divisor)
    for b in pipeline.eval_batches(
      bundle.val_tokens,
      seq_len=config.data.seq_len,
      batch_size=config.train.batch_size,
      max_batches=config.train.eval_batches,
    )
  ]
  variables = jax.device_get(state.variables())
  weights = parallel.branch_weights(variables['params'])
  scalar = parallel.branch_mix(config.model) == 'scalar'
  out['branch_weights'] = weights.tolist()
  out['branch_mix'] = parallel.branch_mix(config.model)
  out['p_gpt_1_rule'] = 'strongest branch scaled by its weight' if scalar else 'strongest branch, weight 1'

  def loss_of(i, variables):
    m = ml_collections.ConfigDict(config.model.to_dict())
    m.pgpt.active_branches = (i,)
    apply = jax.jit(build_model(m).apply)
    return float(np.mean([float(train.cross_entropy(apply(variables, b['inputs']), b['targets'])) for b in batches]))

  for i in range(config.model.pgpt.num_branches):
    out[f'val_loss_branch_{i}'] = loss_of(i, variables)
    if scalar:  # the same branch at weight 1: w = 1 keeps branch 0 whole, w = 0 keeps branch 1 whole
      params = dict(variables['params'], branch_weight=np.asarray(1.0 if i == 0 else 0.0, np.float32))
      out[f'val_loss_branch_{i}_unscaled'] = loss_of(i, dict(variables, params=params))
  best = parallel.strongest_branch(variables['params'])
  out['strongest_branch'] = best
  out['val_loss_p_gpt_1'] = out[f'val_loss_branch_{best}']
  if scalar:
    out['val_loss_p_gpt_1_unscaled'] = out[f'val_loss_branch_{best}_unscaled']
  return out


# ---------------------------------------------------------------------------------------------------------
# vectorised vs loop


def bench_branches(num_branches: int, repeats: int, batch: int, seq: int, width: int, layers: int) -> dict:
  """Jitted AdamW steps of the same p-gpt built two ways; interleaved timing, median per step."""
  steps = {}
  compile_s = {}
  for impl in ('vmap', 'loop'):
    c = pgpt.get_config('')
    c.model.update(
      d_model=width,
      num_heads=4,
      num_layers=layers,
      max_len=seq,
      vocab_size=100,
      dropout=0.0,
      pgpt=dict(num_branches=num_branches, branch_impl=impl),
    )
    model = build_model(c.model)
    tokens = jax.random.randint(jax.random.key(0), (batch, seq + 1), 0, 100)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), tokens[:, :-1]))['params']
    opt = optax.adamw(1e-3)

    def step(params, opt_state, model=model, opt=opt, tokens=tokens):
      def loss_fn(p):
        return train.cross_entropy(model.apply({'params': p}, tokens[:, :-1]), tokens[:, 1:])

      loss, grads = jax.value_and_grad(loss_fn)(params)
      updates, opt_state = opt.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    t0 = time.time()
    fn = jax.jit(step).lower(params, opt.init(params)).compile()
    compile_s[impl] = time.time() - t0
    steps[impl] = (fn, params, opt.init(params))
  times = {'vmap': [], 'loop': []}
  for impl in ('vmap', 'loop'):  # warm up
    fn, p, s = steps[impl]
    jax.block_until_ready(fn(p, s))
  for _ in range(repeats):
    for impl in ('vmap', 'loop'):
      fn, p, s = steps[impl]
      t0 = time.perf_counter()
      jax.block_until_ready(fn(p, s))
      times[impl].append(time.perf_counter() - t0)
  return {
    'num_branches': num_branches,
    'batch': batch,
    'seq': seq,
    'width': width,
    'layers': layers,
    'repeats': repeats,
    **{f'{k}_step_ms': 1e3 * float(np.median(v)) for k, v in times.items()},
    **{f'{k}_compile_s': v for k, v in compile_s.items()},
  }


# ---------------------------------------------------------------------------------------------------------
# outputs


def fmt_m(n):
  return f'{n / 1e6:.2f} M' if n else '-'


def by_label(rows) -> dict:
  """label -> that label's per-seed rows, in run order (seeds sorted)."""
  out = {}
  for r in rows:
    out.setdefault(r['label'], []).append(r)
  return {k: sorted(v, key=lambda r: r.get('seed', 0)) for k, v in out.items()}


def mean_2se(values) -> str:
  v = np.asarray(values, float)
  if len(v) < 2:
    return f'{v.mean():.4f}'
  return f'{v.mean():.4f} ± {2 * v.std(ddof=1) / np.sqrt(len(v)):.4f}'


def _model_lines(groups: dict) -> list[str]:
  """The main table: each model beside the paper's row, and p-gpt's one-branch rows under their model."""
  lines = [
    '| model | paper: params | paper: MB | paper: val loss | ours, paper preset: params | ours: MB | '
    'ours, CPU scale: params | fwd MFLOP/token | ours: val loss, mean ± 2 SE | per seed |',
    '|---|---:|---:|---:|---:|---:|---:|---:|---:|---|',
  ]

  def line(label, paper, preset, params, flops, losses):
    paper_cols = ('-', '-', '-')
    if paper:
      paper_cols = (paper['params'], f'{paper["mb"]:.2f}' if paper['mb'] else '-', f'{paper["val_loss"]:.4f}')
    ours = f'{preset[0]:,} ({fmt_m(preset[0])}) | {preset[1]:.2f}' if preset[0] else '- | -'
    seeds = ', '.join(f'{x:.4f}' for x in losses)
    lines.append(
      f'| {label} | ' + ' | '.join(paper_cols) + f' | {ours} | {fmt_m(params)} | {flops / 1e6:.2f} | '
      f'{mean_2se(losses)} | {seeds} |'
    )

  for label, rs in groups.items():
    r = rs[0]
    pp = r.get('paper_preset', {})
    line(
      label,
      PAPER.get(label),
      (pp.get('total_params'), pp.get('param_mb')),
      r['total_params'],
      r['flops_per_token'],
      [x['final_val_loss'] for x in rs],
    )
    if r['family'] == 'pgpt':
      line(
        f'{label}-1' if label == 'p-gpt' else f"{label}-1, authors' rule",
        PAPER['p-gpt-1'] if label == 'p-gpt' else None,
        (pp.get('single_branch_params'), pp.get('single_branch_param_mb')),
        r['single_branch_params'],
        r['single_branch_flops_per_token'],
        [x['val_loss_p_gpt_1'] for x in rs],
      )
      if 'val_loss_p_gpt_1_unscaled' in r:
        line(
          f'{label}-1, same branch at weight 1',
          None,
          (None, None),
          r['single_branch_params'],
          r['single_branch_flops_per_token'],
          [x['val_loss_p_gpt_1_unscaled'] for x in rs],
        )
  return lines


def _branch_lines(groups: dict) -> list[str]:
  """Each p-gpt run's branches evaluated one at a time, with their trained mixing weights."""
  lines = []
  for label, rs in groups.items():
    if rs[0]['family'] != 'pgpt':
      continue
    lines.append(f'\n{label}, one branch at a time (val loss, trained weight):')
    for r in rs:
      branch = ', '.join(
        f'branch {i}: {r[f"val_loss_branch_{i}"]:.4f} (weight {w:.3f})' for i, w in enumerate(r['branch_weights'])
      )
      lines.append(f'- seed {r.get("seed", 0)}: {branch}')
  return lines


def _bench_lines(bench: list) -> list[str]:
  """The vmap-vs-loop timing table (empty without a timing run)."""
  if not bench:
    return []
  lines = [
    '',
    '### p-gpt branches: vectorised (nn.vmap) vs Python loop',
    '',
    '| branches | batch × ctx | width × blocks | vmap step (ms) | loop step (ms) | loop / vmap | '
    'vmap compile (s) | loop compile (s) |',
    '|---:|---|---|---:|---:|---:|---:|---:|',
  ]
  for b in bench:
    lines.append(
      f'| {b["num_branches"]} | {b["batch"]} × {b["seq"]} | {b["width"]} × {b["layers"]} | '
      f'{b["vmap_step_ms"]:.1f} | {b["loop_step_ms"]:.1f} | {b["loop_step_ms"] / b["vmap_step_ms"]:.2f} | '
      f'{b["vmap_compile_s"]:.1f} | {b["loop_compile_s"]:.1f} |'
    )
  lines.append(
    f'\nJitted AdamW train steps (forward + backward + update), median of {bench[0]["repeats"]} '
    'interleaved steps after a warm-up; same machine and load caveat.'
  )
  return lines


def write_outputs(rows, bench, meta) -> str:
  """results/pgpt_table.{md,json} and the loss-curve figure from the per-seed rows; returns the markdown."""
  groups = by_label(rows)
  lines = _model_lines(groups) + _branch_lines(groups)
  lines += [
    '',
    f'`{meta.get("command", "")}`. CPU scale: {meta["scale"]}; {meta["steps"]} steps × '
    f'{meta["tokens_per_step"]:,} tokens each, seeds {", ".join(str(s) for s in meta.get("seeds", [0]))} '
    '(a seed sets the init and the data order; within a seed every model sees the same batches). '
    f'jax {meta["jax"]} on {meta["device"]} ({meta["cpus"]} CPUs). ± is 2 standard errors over the seeds. '
    'The machine was shared with other jobs: the JSON keeps wall times and tokens/s per run, but they are not '
    'comparable figures.',
  ]
  lines += _bench_lines(bench)
  md = '\n'.join(lines)
  OUT.mkdir(parents=True, exist_ok=True)
  (OUT / 'pgpt_table.md').write_text(md + '\n')
  (OUT / 'pgpt_table.json').write_text(json.dumps(dict(meta=meta, rows=rows, bench=bench, paper=PAPER), indent=1))
  plot(rows, OUT / 'pgpt_loss_curves.png', meta)
  return md


def plot(rows, path, meta):
  """Train and validation curves, averaged over the seeds of each model (the steps line up)."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(12, 4.5))
  for name, rs in by_label(rows).items():
    r = rs[0]
    label = f'{name} ({r["total_params"] / 1e6:.2f} M)'
    steps, _ = zip(*r['train_curve'])
    ax_train.plot(steps, np.mean([[x[1] for x in q['train_curve']] for q in rs], axis=0), label=label)
    steps, _ = zip(*r['val_curve'])
    ax_val.plot(steps, np.mean([[x[1] for x in q['val_curve']] for q in rs], axis=0), marker='o', label=label)
    if 'val_loss_p_gpt_1' in r:
      one = float(np.mean([q['val_loss_p_gpt_1'] for q in rs]))
      ax_val.scatter([steps[-1]], [one], marker='x', s=60, color='k', zorder=5)
      ax_val.annotate(f'{name}-1', (steps[-1], one), textcoords='offset points', xytext=(-40, 4), fontsize=8)
  for ax, title in ((ax_train, 'train loss (mean over each log interval)'), (ax_val, 'validation loss')):
    ax.set_xlabel('step')
    ax.set_ylabel('loss (nats/char)')
    ax.set_title(title)
    ax.grid(alpha=0.3)
  ax_train.set_ylim(top=min(4.0, ax_train.get_ylim()[1]))
  ax_val.legend(fontsize=8)
  seeds = meta.get('seeds', [0])
  fig.suptitle(
    f'gpt / p-gpt / lc-gpt / cc-gpt at CPU scale ({meta["steps"]} steps, mean of {len(seeds)} seed(s), '
    'same batches within a seed)'
  )
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--steps', type=int, default=400)
  parser.add_argument('--seeds', default='0', help='comma-separated seeds (init and data order), e.g. 0,1,2')
  parser.add_argument('--runs', default='', help='comma-separated labels (default: the runs of RUNS)')
  parser.add_argument('--extras', action='store_true', help='also the p-gpt project form and cc-gpt kernel 3')
  parser.add_argument('--bench_repeats', type=int, default=10, help='0 skips the vmap-vs-loop timing')
  args = parser.parse_args()
  seeds = [int(s) for s in args.seeds.split(',') if s.strip()]
  candidates = {**RUNS, **EXTRAS} if args.extras or args.runs else RUNS
  runs = {k: v for k, v in candidates.items() if not args.runs or k in args.runs.split(',')}
  load_before, t0 = os.getloadavg(), time.time()
  rows, bench = [], []

  def meta():
    return provenance.run_meta(
      shlex.join(['python', '-m', 'experiments.pgpt_table', *sys.argv[1:]]),
      args.steps,
      SCALE['train']['batch_size'] * SCALE['data']['seq_len'],
      '4 blocks (p-gpt: 2 branches × 2), d_model 128 (lc/cc: 128 → 64 → 32), 4 heads, ctx 64, '
      'char vocabulary of the embedded corpus (2 MB), batch 16, AdamW lr 2e-3 cosine, no dropout',
      load_before,
      t0,
      seeds=seeds,
      complete=False,
    )

  with tempfile.TemporaryDirectory(prefix='pgpt_table_') as root:
    first = make_config(gpt_config, 'paper_pgpt_baseline', {}, args.steps)
    data_cache = os.path.join(root, 'data_cache')
    pipeline.prepare_data(first.data, data_cache)
    for seed in seeds:  # seed-major: a cut-short run still has whole seeds of every model
      for label, (module, preset, overrides, paper_spec) in runs.items():
        print(f'== {label}, seed {seed}', flush=True)
        row = run_one(label, make_config(module, preset, overrides, args.steps, seed), data_cache, root)
        row['paper_preset'] = paper_summary(paper_spec)
        rows.append(row)
        print(f'   val loss {row["final_val_loss"]:.4f}, {row["total_params"]:,} params', flush=True)
        write_outputs(rows, bench, meta())  # after every run, so a cut-short run leaves its results
  if args.bench_repeats > 0:
    for branches, layers in ((2, 4), (4, 4)):
      print(f'== bench {branches} branches', flush=True)
      bench.append(bench_branches(branches, args.bench_repeats, batch=16, seq=64, width=128, layers=layers))
      print(f'   {bench[-1]}', flush=True)
  print(write_outputs(rows, bench, dict(meta(), complete=True)))


if __name__ == '__main__':
  main()
