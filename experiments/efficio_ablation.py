"""GPT-Efficio ablation on the embedded Python corpus: `python -m experiments.efficio_ablation`.

Cross-layer sharing {all, none} × embedding factorization {E=64, off}, plus sharing in G=2 / 4 groups (and
with --sweep_e E=16, 32), all at one CPU-sized scale (8 layer applications, d_model 96, ctx 64, BPE 2048,
batch 16) and equal steps, same seed and same batches. Every run is the standard `train.train_and_evaluate`
on a configs/efficio.py preset with the same scale overrides. Writes experiments/results/efficio_ablation.{md,json,png}.
"""

import argparse
import json
import os
import pathlib
import shutil
import tempfile
import time

import jax
import ml_collections
import numpy as np

from effjax.configs import efficio
from effjax import accounting, metrics, train
from effjax.data import pipeline

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
SWEEP_E = {  # --sweep_e
  'share all + E=16': ('', {'embed_dim': 16}),
  'share all + E=32': ('', {'embed_dim': 32}),
}


def make_config(preset: str, model_overrides: dict, steps: int):
  c = efficio.get_config(preset)
  for section, values in SCALE.items():
    c[section].update(values)
  c.model.update(model_overrides)
  c.train.update(steps=steps, eval_every=min(c.train.eval_every, steps))
  c.checkpoint.every = steps
  return c


def run_one(label: str, config, data_cache: str, root: str) -> dict:
  workdir = os.path.join(root, label.replace(' ', '_').replace('/', '_'))
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


def write_outputs(rows: list[dict], meta: dict) -> str:
  lines = [
    '| run | share | E | params | trainable | embedding | fwd FLOPs/token | final val loss | val bpb | '
    'tokens/s | wall (s) |',
    '|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|',
  ]
  for r in rows:
    share = r['share_layers'] + (f' G={r["num_groups"]}' if r['share_layers'] == 'groups' else '')
    lines.append(
      f'| {r["label"]} | {share} | {r["embed_dim"] or "-"} | {r["total_params"]:,} | '
      f'{r["trainable_params"]:,} | {r["embedding_params"]:,} | {r["flops_per_token"] / 1e6:.2f} M | '
      f'{r["final_val_loss"]:.4f} | {r["final_val_bpb"]:.3f} | {r["tokens_per_sec"]:,.0f} | '
      f'{r["wall_s"]:.0f} |'
    )
  lines += [
    '',
    f'`{meta["command"]}`: {meta["steps"]} steps × {meta["tokens_per_step"]:,} tokens, seed 0, '
    'same batches for every run; '
    f'{meta["scale"]}. jax {meta["jax"]} on {meta["device"]} ({meta["cpus"]} CPUs); total '
    f'{meta["total_wall_s"] / 60:.1f} min; load average before/after {meta["loadavg_before"][0]:.2f}/'
    f'{meta["loadavg_after"][0]:.2f} (shared machine: other jobs were running, so tokens/s and wall '
    'times are noisy).',
  ]
  md = '\n'.join(lines)
  OUT.mkdir(parents=True, exist_ok=True)
  (OUT / 'efficio_ablation.md').write_text(md + '\n')
  (OUT / 'efficio_ablation.json').write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
  plot(rows, OUT / 'efficio_ablation.png')
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


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--steps', type=int, default=300)
  parser.add_argument('--sweep_e', action='store_true', help='also E=16 and E=32 with sharing (2 more runs)')
  parser.add_argument('--runs', default='', help='comma-separated labels (default: all)')
  args = parser.parse_args()
  candidates = {**RUNS, **(SWEEP_E if args.sweep_e else {})}
  runs = {k: v for k, v in candidates.items() if not args.runs or k in args.runs.split(',')}
  load_before, t0 = os.getloadavg(), time.time()
  rows = []
  with tempfile.TemporaryDirectory(prefix='efficio_ablation_') as root:
    first = make_config('', {}, args.steps)
    data_cache = os.path.join(root, 'data_cache')
    pipeline.prepare_data(first.data, data_cache)
    for label, (preset, overrides) in runs.items():
      print(f'== {label}', flush=True)
      rows.append(run_one(label, make_config(preset, overrides, args.steps), data_cache, root))
      print(
        f'   val loss {rows[-1]["final_val_loss"]:.4f}, {rows[-1]["total_params"]:,} params, '
        f'{rows[-1]["wall_s"]:.0f} s',
        flush=True,
      )
  command = (
    'python -m experiments.efficio_ablation'
    + (' --sweep_e' if args.sweep_e else '')
    + (f' --steps={args.steps}' if args.steps != 300 else '')
  )
  meta = dict(
    command=command,
    steps=args.steps,
    tokens_per_step=SCALE['train']['batch_size'] * SCALE['data']['seq_len'],
    scale=(
      '8 layer applications, d_model 96, 4 heads, ctx 64, BPE vocab 2048 on the embedded corpus '
      '(2 MB), batch 16, AdamW lr 2e-3 cosine'
    ),
    jax=jax.__version__,
    device=str(jax.devices()[0]),
    cpus=os.cpu_count(),
    loadavg_before=load_before,
    loadavg_after=os.getloadavg(),
    total_wall_s=time.time() - t0,
  )
  print(write_outputs(rows, meta))


if __name__ == '__main__':
  main()
