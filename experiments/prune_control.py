"""Pruning with controls and seeds (seed 001): `python -m experiments.prune_control [--seeds 0,1,2] [--ks 2]`.

For every seed: trains experiments/prune_layers' 8-block GPT (600 steps), removes its last k blocks and fine-tunes
them (150 steps, as prune_layers does), and beside each pruned model trains the control the single-seed study
lacked: a shallow (8-k)-block GPT from scratch on the same token budget (600 + 150 steps, the base recipe's
schedule), evaluated on the same validation batches. k = 0 (the unpruned model given the same 150 extra steps) is
always run: it is the reference of "negligible loss".

Two comparisons per k, as relative validation-loss differences, mean ± sample std over the seeds:
  pruned vs unpruned   L(pruned k + fine-tune) / L(unpruned + fine-tune) - 1: what removing depth costs;
  shallow vs pruned    L(shallow from scratch) / L(pruned k + fine-tune) - 1: positive = the pruned model keeps
                       something a model of its depth does not learn from scratch on the same tokens.
Run dirs go to <root>/seed<s>/{base,shallow<L>} (git-ignored, resumable: a finished k or control is skipped).
Writes experiments/results/prune_control.{json,md}. Seeds can run as parallel processes (`--seeds 1 --out X1`, ...)
whose outputs `--combine X0.json,X1.json,...` merges (no training).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from experiments import prune_layers, scaling

RESULTS = prune_layers.RESULTS


def seed_config(seed: int):
  c = prune_layers.default_config()
  c.seed = seed
  return c


def shallow_config(config, layers: int, steps: int):
  """The base recipe at `layers` blocks, trained from scratch for `steps` steps (one eval, at the end)."""
  import ml_collections  # pylint: disable=import-outside-toplevel

  c = ml_collections.ConfigDict(config.to_dict())
  c.model.num_layers = layers
  c.train.update(steps=steps, eval_every=steps, log_every=max(steps // 6, 1))
  c.checkpoint.every = steps
  return c


def train_shallow(config, workdir: str, batches, progress: bool) -> float:
  """Validation loss of a from-scratch run in `workdir` on `batches` (trains it unless it is finished)."""
  import jax  # pylint: disable=import-outside-toplevel
  from effjax import train  # pylint: disable=import-outside-toplevel

  done = os.path.join(workdir, 'control_loss.json')
  if os.path.exists(done):
    with open(done, encoding='utf-8') as f:
      return json.load(f)['loss']
  train.train_and_evaluate(config, workdir, devices=jax.devices()[:1], progress=progress)
  cfg, state, _ = prune_layers.load_trained(config, workdir)
  if int(state.step) < config.train.steps:
    raise SystemExit(f'{workdir} stopped at step {int(state.step)}; rerun to finish it')
  loss = prune_layers.evaluate(cfg, state.variables(), batches)
  with open(done, 'w', encoding='utf-8') as f:
    json.dump(dict(loss=loss, steps=config.train.steps, layers=config.model.num_layers), f)
  return loss


def one_seed(seed: int, ks: list[int], root: str, finetune_steps: int, finetune_lr: float, progress: bool) -> dict:
  base_dir = os.path.join(root, f'seed{seed}', 'base')
  config = seed_config(seed)
  # every seed tokenizes the same corpus the same way: reuse the first seed's data cache
  scaling._seed_data_cache(root, base_dir)  # pylint: disable=protected-access
  res = prune_layers.study(
    config, base_dir, finetune_steps, finetune_lr, ks=sorted({0, *ks}), progress=progress
  )  # trains or resumes the base run (a finished one returns at once)
  scaling._publish_data_cache(root, base_dir)  # pylint: disable=protected-access
  cfg, _, bundle = prune_layers.load_trained(None, base_dir)
  batches = prune_layers.val_batches(cfg, bundle)
  rows = {r['k']: r for r in res['rows']}
  budget = cfg.train.steps + finetune_steps
  for k in ks:
    if k == 0:
      continue
    layers = cfg.model.num_layers - k
    workdir = os.path.join(root, f'seed{seed}', f'shallow{layers}')
    if not os.path.exists(os.path.join(workdir, 'data')):
      import shutil  # pylint: disable=import-outside-toplevel

      shutil.copytree(os.path.join(base_dir, 'data'), os.path.join(workdir, 'data'))
    print(f'seed {seed}: control, {layers} blocks from scratch for {budget} steps', flush=True)
    rows[k]['shallow_loss'] = train_shallow(shallow_config(cfg, layers, budget), workdir, batches, progress)
  return dict(
    seed=seed,
    rows=[rows[k] for k in sorted(rows)],
    num_layers=cfg.model.num_layers,
    train_steps=cfg.train.steps,
    budget_steps=budget,
  )


def summarize(seeds: list[dict]) -> list[dict]:
  """Per k: mean and sample std over seeds of the two relative differences (see the module docstring)."""
  out = []
  for k in [r['k'] for r in seeds[0]['rows']]:
    if k == 0:
      continue
    pruned, shallow = [], []
    for s in seeds:
      rows = {r['k']: r for r in s['rows']}
      pruned.append(rows[k]['loss_after'] / rows[0]['loss_after'] - 1)
      shallow.append(rows[k]['shallow_loss'] / rows[k]['loss_after'] - 1)
    stats = lambda xs: dict(
      values=xs, mean=float(np.mean(xs)), std=float(np.std(xs, ddof=1)) if len(xs) > 1 else float('nan'), n=len(xs)
    )
    out.append(
      dict(
        k=k, layers_kept=seeds[0]['num_layers'] - k, pruned_vs_unpruned=stats(pruned), shallow_vs_pruned=stats(shallow)
      )
    )
  return out


def markdown(res: dict) -> str:
  s0 = res['seeds'][0]
  lines = [
    '# Layer pruning with controls (seed 001)',
    '',
    f'{s0["num_layers"]}-block GPT trained {s0["train_steps"]} steps; last k blocks removed, then fine-tuned '
    f'{res["finetune_steps"]} steps at lr {res["finetune_lr"]}; control: a (L-k)-block GPT from scratch for '
    f'{s0["budget_steps"]} steps (same tokens). Seeds {", ".join(str(s["seed"]) for s in res["seeds"])}. '
    f'{res["meta"]}',
    '',
    '| seed | k | unpruned + fine-tune | pruned | pruned + fine-tune | shallow from scratch |',
    '|---:|---:|---:|---:|---:|---:|',
  ]
  for s in res['seeds']:
    ref = s['rows'][0]['loss_after']
    for r in s['rows'][1:]:
      lines.append(
        f'| {s["seed"]} | {r["k"]} | {ref:.4f} | {r["loss_before"]:.4f} | {r["loss_after"]:.4f} | '
        f'{r["shallow_loss"]:.4f} |'
      )
  lines += [
    '',
    '| k | blocks kept | pruned vs unpruned (mean ± std) | shallow vs pruned (mean ± std) | seeds |',
    '|---:|---:|---:|---:|---:|',
  ]
  for r in res['summary']:
    a, b = r['pruned_vs_unpruned'], r['shallow_vs_pruned']
    lines.append(
      f'| {r["k"]} | {r["layers_kept"]} | {100 * a["mean"]:+.2f}% ± {100 * a["std"]:.2f}% | '
      f'{100 * b["mean"]:+.2f}% ± {100 * b["std"]:.2f}% | {a["n"]} |'
    )
  return '\n'.join(lines + [''])


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--seeds', default='0,1,2')
  p.add_argument('--ks', default='2', help='numbers of last blocks removed (k = 0 always runs)')
  p.add_argument('--root', default='experiments/runs/prune_control')
  p.add_argument('--finetune_steps', type=int, default=150)
  p.add_argument('--finetune_lr', type=float, default=5e-4)
  p.add_argument('--out', default=os.path.join(RESULTS, 'prune_control'))
  p.add_argument(
    '--combine',
    default='',
    help='comma-separated JSON outputs of earlier runs (e.g. one seed each, '
    'run in parallel): merge their seeds into --out without training',
  )
  args = p.parse_args(argv)
  if args.combine:
    parts = []
    for path in args.combine.split(','):
      with open(path, encoding='utf-8') as f:
        parts.append(json.load(f))
    per_seed = sorted((s for part in parts for s in part['seeds']), key=lambda s: s['seed'])
    res = dict(
      parts[0],
      seeds=per_seed,
      summary=summarize(per_seed),
      command=' + '.join(part['command'] for part in parts),
      meta=' '.join(part['meta'] for part in parts),
    )
  else:
    seeds = [int(s) for s in args.seeds.split(',')]
    ks = [int(k) for k in args.ks.split(',')]
    t0, load0 = time.time(), os.getloadavg()[0]
    per_seed = [one_seed(s, ks, args.root, args.finetune_steps, args.finetune_lr, progress=False) for s in seeds]
    res = dict(
      seeds=per_seed,
      finetune_steps=args.finetune_steps,
      finetune_lr=args.finetune_lr,
      summary=summarize(per_seed),
      command=f'python -m experiments.prune_control --seeds {args.seeds} --ks {args.ks}',
      meta=f'Seed(s) {args.seeds}: wall time {time.time() - t0:.0f} s on a shared 2-core CPU (load average '
      f'{load0:.1f} at start).',
    )
  md = markdown(res)
  with open(args.out + '.md', 'w', encoding='utf-8') as f:
    f.write(md)
  with open(args.out + '.json', 'w', encoding='utf-8') as f:
    json.dump(res, f, indent=1)
  print(md)
  return res


if __name__ == '__main__':
  main()
