"""GPT-Efficio ablation on the embedded Python corpus: `python -m experiments.efficio_ablation`.

Cross-layer sharing {all, none} × embedding factorization {E=64, off}, plus sharing in G=2 / 4 groups (and
with --sweep_e E=16, 32), all at one CPU-sized scale (8 layer applications, d_model 96, ctx 64, BPE 2048,
batch 16) and equal steps, same seed and same batches. Every run is the standard `train.train_and_evaluate`
on a configs/efficio.py preset with the same scale overrides. Writes experiments/results/efficio_ablation.{md,json,png}.

Grid: `--lrs` and `--seeds` (comma-separated) run every chosen variant at every learning rate and seed; a seed
fixes both the initialisation and the batch order, so runs with the same seed see the same batches and can be
compared pair by pair. `--lrs=best` takes, per variant, the learning rate whose seed-0 run has the lowest final
validation loss in the output file. Rows are merged into `--out` (results/<out>.json) keyed by (variant, lr,
seed), so a sweep and a later seeds command add to one file; each row names the command that wrote it.
  python -m experiments.efficio_ablation --out=efficio_grid --runs=core --lrs=1e-3,2e-3,4e-3 --seeds=0
  python -m experiments.efficio_ablation --out=efficio_grid --runs=core --lrs=best --seeds=1,2
(results/efficio_grid.json was written by such commands split over two processes, plus `--runs=equal --lrs=1e-3`
with seeds 0, 1, 2: its rows name them.)

Equal compute: sharing does not change the work per token (the shared block is applied 8 times, as the 8
unshared blocks are); only the factorized head does (V·E + E·H instead of V·H multiply-adds), so the shared +
factorized model does 4.5 % fewer forward FLOPs per token than the baseline. EQUAL_FLOPS widens it to d_model 100
(the nearest width the 4 heads divide that is not below the baseline's FLOPs/token): 2.41 M vs the baseline's
2.36 M forward FLOPs per token (+2.3 %), with the same steps and batches, hence also equal training FLOPs to 2.3 %.
"""

import argparse
import fcntl
import json
import os
import pathlib
import shutil
import tempfile
import time

import ml_collections
import numpy as np

from effjax.configs import efficio
from effjax import accounting, metrics, train
from effjax.data import pipeline
from experiments import provenance

OUT = pathlib.Path(__file__).parent / 'results'
SCALE = {
  'model': dict(num_layers=8, d_model=96, num_heads=4, max_len=64, dropout=0.0),
  'data': dict(corpus='embedded', tokenizer='bpe', bpe_vocab_size=2048, seq_len=64, max_bytes=2_000_000),
  'train': dict(batch_size=16, lr=2e-3, warmup_steps=30, log_every=25, eval_every=100, eval_batches=4),
}
# label: (preset, extra model overrides)
RUNS = {
  'share all + E=64 (efficio)': ('', {}),
  'share all, no factor': ('nofactor', {}),
  'no sharing + E=64': ('nosharing', {}),
  'neither (baseline)': ('baseline', {}),
  'groups G=2 + E=64': ('groups2', {}),
  'groups G=4 + E=64': ('groups4', {}),
}
EQUAL_FLOPS = {'share all + E=64, d_model 100 (equal FLOPs)': ('', {'d_model': 100})}
CORE = (
  'share all + E=64 (efficio)',
  'share all, no factor',
  'no sharing + E=64',
  'neither (baseline)',
)
SWEEP_E = {  # --sweep_e
  'share all + E=16': ('', {'embed_dim': 16}),
  'share all + E=32': ('', {'embed_dim': 32}),
}


def make_config(preset: str, model_overrides: dict, steps: int, lr: float | None = None, seed: int = 0):
  c = efficio.get_config(preset)
  for section, values in SCALE.items():
    c[section].update(values)
  c.model.update(model_overrides)
  c.train.update(steps=steps, eval_every=min(c.train.eval_every, steps))
  if lr is not None:
    c.train.lr = lr
  c.seed = seed
  c.checkpoint.every = steps
  return c


def run_one(label: str, config, data_cache: str, root: str) -> dict:
  name = f'{label}_lr{config.train.lr:g}_seed{config.seed}'
  workdir = os.path.join(root, ''.join(ch if ch.isalnum() or ch in '.-=' else '_' for ch in name))
  shutil.copytree(data_cache, os.path.join(workdir, 'data'))  # tokenize once for every run
  t0 = time.time()
  result = train.train_and_evaluate(config, workdir)
  wall = time.time() - t0
  lines = metrics.read_metrics(workdir)
  train_lines = [m for m in lines if m['split'] == 'train']
  m = _with_vocab(config, workdir)
  counts = accounting.param_counts(m)
  return {
    'label': label,
    'lr': config.train.lr,
    'seed': config.seed,
    'd_model': config.model.d_model,
    'share_layers': config.model.share_layers,
    'num_groups': config.model.num_groups,
    'embed_dim': config.model.embed_dim,
    **counts,
    'flops_per_token': accounting.flops_per_token(m, config.data.seq_len),
    'final_val_loss': result['loss'],
    'final_val_bpb': result['bpb'],
    # the first logging interval includes compilation; tokens/s is the mean over the rest
    'tokens_per_sec': float(np.mean([t['tokens_per_sec'] for t in train_lines[1:]])),
    'wall_s': wall,
    'train_curve': [(t['step'], t['loss']) for t in train_lines],
    'val_curve': [(e['step'], e['loss']) for e in lines if e['split'] == 'eval'],
  }


def _with_vocab(config, workdir):
  """The run's model config with the vocabulary the tokenizer gave it (config.json of the run)."""
  with open(os.path.join(workdir, 'config.json'), encoding='utf-8') as f:
    return ml_collections.ConfigDict(json.load(f)['model'])


def write_outputs(rows: list[dict], meta: dict, out: str = 'efficio_ablation') -> str:
  lines = [
    '| run | lr | seed | share | E | params | trainable | embedding | fwd FLOPs/token | final val loss | val bpb | '
    'tokens/s | wall (s) |',
    '|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|',
  ]
  for r in rows:
    share = r['share_layers'] + (f' G={r["num_groups"]}' if r['share_layers'] == 'groups' else '')
    lines.append(
      f'| {r["label"]} | {r.get("lr", SCALE["train"]["lr"]):g} | {r.get("seed", 0)} | {share} | '
      f'{r["embed_dim"] or "-"} | {r["total_params"]:,} | '
      f'{r["trainable_params"]:,} | {r["embedding_params"]:,} | {r["flops_per_token"] / 1e6:.2f} M | '
      f'{r["final_val_loss"]:.4f} | {r["final_val_bpb"]:.3f} | {r["tokens_per_sec"]:,.0f} | '
      f'{r["wall_s"]:.0f} |'
    )
  lines += [
    '',
    f'{"; ".join(f"`{c}`" for c in meta.get("commands", [meta["command"]]))}: {meta["steps"]} steps × '
    f'{meta["tokens_per_step"]:,} tokens; runs with the same seed see the same batches; '
    f'{meta["scale"]}. jax {meta["jax"]} on {meta["device"]} ({meta["cpus"]} CPUs); last command '
    f'{meta["total_wall_s"] / 60:.1f} min; load average before/after {meta["loadavg_before"][0]:.2f}/'
    f'{meta["loadavg_after"][0]:.2f} (shared machine: other jobs were running, so tokens/s and wall '
    'times are noisy).',
  ]
  md = '\n'.join(lines)
  OUT.mkdir(parents=True, exist_ok=True)
  (OUT / f'{out}.md').write_text(md + '\n')
  (OUT / f'{out}.json').write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
  grid = len({(r.get('lr'), r.get('seed')) for r in rows}) > 1
  (plot_grid if grid else plot)(rows, OUT / f'{out}.png')
  return md


def plot(rows, path):
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(12, 4.5))
  for r in rows:
    steps, losses = zip(*r['train_curve'])
    ax_train.plot(steps, losses, label=r['label'])
    steps, losses = zip(*r['val_curve'])
    ax_val.plot(steps, losses, marker='o', label=r['label'])
  for ax, title in ((ax_train, 'train loss (mean over each log interval)'), (ax_val, 'validation loss')):
    ax.set_xlabel('step')
    ax.set_ylabel('loss (nats/token)')
    ax.set_title(title)
    ax.grid(alpha=0.3)
  ax_train.set_ylim(top=min(8.0, ax_train.get_ylim()[1]))
  ax_val.legend(fontsize=8)
  fig.suptitle('GPT-Efficio ablation: sharing × factorization (equal steps)')
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def plot_grid(rows, path):
  """Learning-rate sweep (seed-0 final validation loss per lr) and, at each variant's best lr, the mean validation
  curve over its seeds with the seeds' spread."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  best = best_lrs(rows)
  fig, (ax_lr, ax_val) = plt.subplots(1, 2, figsize=(12, 4.5))
  for label in dict.fromkeys(r['label'] for r in rows):
    sweep = sorted((r['lr'], r['final_val_loss']) for r in rows if r['label'] == label and r['seed'] == 0)
    (line,) = ax_lr.plot(*zip(*sweep), marker='o', label=label)
    at_best = [r for r in rows if r['label'] == label and r['lr'] == best[label]]
    finals = [r['final_val_loss'] for r in at_best]
    ax_lr.errorbar(
      [best[label]],
      [np.mean(finals)],
      yerr=[[np.mean(finals) - min(finals)], [max(finals) - np.mean(finals)]],
      color=line.get_color(),
      capsize=4,
      marker='s',
      alpha=0.6,
    )
    steps = [s for s, _ in at_best[0]['val_curve']]
    curves = np.array([[v for _, v in r['val_curve']] for r in at_best])
    ax_val.plot(
      steps,
      curves.mean(0),
      marker='o',
      color=line.get_color(),
      label=f'{label}, lr {best[label]:g} ({len(at_best)} seeds)',
    )
    ax_val.fill_between(steps, curves.min(0), curves.max(0), color=line.get_color(), alpha=0.2)
  ax_lr.set_xscale('log')
  ax_lr.set_xlabel('peak learning rate')
  ax_lr.set_ylabel('final validation loss (nats/token)')
  ax_lr.set_title('seed 0 per lr; square: mean and range over seeds at the best lr')
  ax_val.set_xlabel('step')
  ax_val.set_ylabel('validation loss (nats/token)')
  ax_val.set_title('at each best lr: mean over seeds, band = min..max')
  for ax in (ax_lr, ax_val):
    ax.grid(alpha=0.3)
  ax_val.legend(fontsize=7)
  fig.suptitle('GPT-Efficio: learning-rate sweep and seeds (equal steps)')
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def select(spec: str, sweep_e: bool) -> dict:
  """--runs: comma-separated preset names (efficio, nofactor, nosharing, baseline, groups2, groups4), labels, or the
  groups `core` (the four sharing × factorization variants), `equal` (the equal-FLOPs shared model), `all` (the
  original ablation's runs); empty: the original ablation."""
  known = {**RUNS, **EQUAL_FLOPS, **(SWEEP_E if sweep_e else {})}
  if not spec:
    return {**RUNS, **(SWEEP_E if sweep_e else {})}
  out = {}
  for item in spec.split(','):
    alias = {preset or 'efficio': (label,) for label, (preset, over) in RUNS.items()}
    names = {'core': CORE, 'equal': tuple(EQUAL_FLOPS), 'all': tuple(RUNS), **alias}.get(item, (item,))
    for n in names:
      if n not in known:
        raise SystemExit(f'unknown run {n!r}; known: {", ".join(known)}')
      out[n] = known[n]
  return out


def best_lrs(rows: list[dict]) -> dict:
  """Per variant: the learning rate of its lowest seed-0 final validation loss."""
  best = {}
  for r in rows:
    if r.get('seed', 0) == 0 and (r['label'] not in best or r['final_val_loss'] < best[r['label']][1]):
      best[r['label']] = (r.get('lr', SCALE['train']['lr']), r['final_val_loss'])
  return {k: v[0] for k, v in best.items()}


def key(r: dict) -> tuple:
  return (r['label'], r.get('lr', SCALE['train']['lr']), r.get('seed', 0))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--steps', type=int, default=300)
  parser.add_argument('--sweep_e', action='store_true', help='also E=16 and E=32 with sharing (2 more runs)')
  parser.add_argument('--runs', default='', help='comma-separated labels or core / equal / all (default: all)')
  parser.add_argument('--lrs', default='', help='comma-separated learning rates, or best (default: 2e-3)')
  parser.add_argument('--seeds', default='0', help='comma-separated seeds')
  parser.add_argument('--out', default='efficio_ablation', help='results/<out>.{json,md,png}; rows are merged')
  args = parser.parse_args()
  runs = select(args.runs, args.sweep_e)
  seeds = [int(s) for s in args.seeds.split(',')]
  path = OUT / f'{args.out}.json'
  old = json.loads(path.read_text()) if path.exists() else dict(meta={}, rows=[])
  if args.lrs == 'best':
    best = best_lrs(old['rows'])
    missing = [k for k in runs if k not in best]
    if missing:
      raise SystemExit(f'--lrs=best: no seed-0 run of {missing} in {path}')
    grid = [(label, best[label], seed) for label in runs for seed in seeds]
  else:
    lrs = [float(x) for x in args.lrs.split(',')] if args.lrs else [SCALE['train']['lr']]
    grid = [(label, lr, seed) for label in runs for lr in lrs for seed in seeds]
  command = (
    'python -m experiments.efficio_ablation'
    + (' --sweep_e' if args.sweep_e else '')
    + (f' --steps={args.steps}' if args.steps != 300 else '')
    + (f' --out={args.out}' if args.out != 'efficio_ablation' else '')
    + (f' --runs={args.runs}' if args.runs else '')
    + (f' --lrs={args.lrs}' if args.lrs else '')
    + (f' --seeds={args.seeds}' if args.seeds != '0' else '')
  )
  load_before, t0 = os.getloadavg(), time.time()
  with tempfile.TemporaryDirectory(prefix='efficio_ablation_') as root:
    first = make_config('', {}, args.steps)
    data_cache = os.path.join(root, 'data_cache')
    pipeline.prepare_data(first.data, data_cache)
    for label, lr, seed in grid:
      preset, overrides = runs[label]
      print(f'== {label}, lr {lr:g}, seed {seed}', flush=True)
      row = run_one(label, make_config(preset, overrides, args.steps, lr, seed), data_cache, root)
      row['command'] = command
      print(
        f'   val loss {row["final_val_loss"]:.4f}, {row["total_params"]:,} params, {row["wall_s"]:.0f} s', flush=True
      )
      # after every run, merged under a lock into what is on disk then: an interrupted grid keeps what it
      # finished, and two commands may fill one file at the same time
      OUT.mkdir(parents=True, exist_ok=True)
      with open(os.path.join(tempfile.gettempdir(), f'{args.out}.lock'), 'w', encoding='utf-8') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        disk = json.loads(path.read_text()) if path.exists() else dict(meta={}, rows=[])
        rows = {key(r): r for r in disk['rows']}
        rows[key(row)] = row
        previous = disk['meta'].get('commands', [disk['meta'].get('command')])
        meta = provenance.run_meta(
          command,
          args.steps,
          SCALE['train']['batch_size'] * SCALE['data']['seq_len'],
          '8 layer applications, d_model 96 (the equal-FLOPs run: 100), 4 heads, ctx 64, BPE vocab 2048 on the '
          'embedded corpus (2 MB), batch 16, AdamW cosine, 30 warm-up steps',
          load_before,
          t0,
          commands=[c for c in dict.fromkeys([*previous, command]) if c],
        )
        order = [*RUNS, *EQUAL_FLOPS, *SWEEP_E]
        ordered = sorted(rows.values(), key=lambda r: (order.index(r['label']), *key(r)[1:]))
        md = write_outputs(ordered, meta, args.out)
  print(md)


if __name__ == '__main__':
  main()
