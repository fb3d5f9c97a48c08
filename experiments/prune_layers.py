"""Over-parameterization study (seed 001): how much of a trained GPT's depth can go?
`python -m experiments.prune_layers [--workdir DIR] [--finetune_steps 150]`

1. Trains a GPT in `--workdir` (default experiments/runs/prune/base; resumable, or reuses a finished run, also
   one trained with `python -m effjax.main --mode=train`; its config.json is then taken as is).
2. For k = 0 .. L-1 removes the LAST k blocks: slices the scanned 'layers' axis of params['stack']['layers']
   (or drops stack/layer_i for an unrolled stack) and sets model.num_layers = L - k; the final norm and the tied
   head are kept, so block L-k's output goes straight to them.
3. Evaluates the pruned model on the validation batches, then fine-tunes it briefly (`--finetune_steps` steps of
   the ordinary train step, train.make_train_step, AdamW restarted, lr `--finetune_lr` with warm-up and cosine)
   and evaluates again. k = 0 is fine-tuned as well: it is the control for "more training" (a pruned model only
   counts as lossless if it matches the unpruned model given the same extra steps).

Results are kept per k in <workdir>/prune_results.json (a rerun skips finished k's, so Ctrl-C + rerun resumes).
Writes experiments/results/prune_<name>.{json,md,png}: validation loss vs the fraction of layers kept, before
and after the fine-tune.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')


def default_config():
  """An 8-block GPT on the scaling sweep's data (BPE 1024, embedded corpus, ctx 64): ~2-3 CPU minutes."""
  from experiments import scaling  # pylint: disable=import-outside-toplevel

  c = scaling.base_config('cpu')
  c.model.update(num_layers=8, d_model=64, num_heads=4)
  c.train.update(steps=600, eval_every=200, log_every=50)
  c.checkpoint.every = 200
  return c


def prune_tree(tree: dict, keep: int) -> dict:
  """A variable collection with only the first `keep` blocks of its GPT layer stack (scanned or unrolled)."""
  if 'stack' not in tree:
    return dict(tree)
  stack = dict(tree['stack'])
  if 'layers' in stack:
    import jax  # pylint: disable=import-outside-toplevel

    stack['layers'] = jax.tree.map(lambda x: x[:keep], stack['layers'])
  else:
    names = [k for k in stack if k.startswith('layer_') and k[6:].isdigit()]
    if not names or any(k in stack for k in ('shared', 'groups')):
      raise ValueError(
        f'prune_layers works on independent GPT blocks (share_layers=none): found {sorted(stack)} in the stack'
      )
    stack = {k: v for k, v in stack.items() if not (k in names and int(k[6:]) >= keep)}
  return {**tree, 'stack': stack}


def prune(config, variables: dict, k: int):
  """(config with num_layers = L - k, variables without the last k blocks) for a plain GPT."""
  import ml_collections  # pylint: disable=import-outside-toplevel

  m = config.model
  if m.family != 'gpt' or m.share_layers != 'none' or m.doping.pattern:
    raise ValueError(
      f'prune_layers supports a plain GPT (family gpt, no sharing, no doping); got family='
      f'{m.family!r}, share_layers={m.share_layers!r}, doping={m.doping.pattern!r}'
    )
  if not 0 <= k < m.num_layers:
    raise ValueError(f'k={k} must be in 0..num_layers-1={m.num_layers - 1}')
  pruned = ml_collections.ConfigDict(config.to_dict())
  pruned.model.num_layers = m.num_layers - k
  return pruned, {name: prune_tree(tree, m.num_layers - k) for name, tree in variables.items()}


# -------------------------------------------------------------------------------------------------- pieces
def load_trained(config, workdir: str):
  """(resolved config, TrainState, DataBundle) of the newest checkpoint in workdir."""
  import jax  # pylint: disable=import-outside-toplevel
  import ml_collections  # pylint: disable=import-outside-toplevel
  from effjax import checkpoint, state as state_lib, train  # pylint: disable=import-outside-toplevel

  with open(os.path.join(workdir, 'config.json'), encoding='utf-8') as f:
    config = ml_collections.ConfigDict(json.load(f))
  bundle, config = train.load_data(config, workdir)
  setup = state_lib.make_setup(config, devices=jax.devices()[:1])
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), config.checkpoint.keep, read_only=True)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise SystemExit(f'{workdir} has no checkpoint; train it first')
    state, _ = ckpt.restore(step, setup.abstract_state)
  finally:
    ckpt.close()
  return config, state, bundle


def val_batches(config, bundle, divisor: int = 1):
  from effjax import train  # pylint: disable=import-outside-toplevel
  from effjax.data import pipeline  # pylint: disable=import-outside-toplevel

  batches = pipeline.eval_batches(
    bundle.val_tokens,
    seq_len=config.data.seq_len,
    batch_size=config.train.batch_size,
    max_batches=config.train.eval_batches,
  )
  return [train.eval_rows(b, divisor) for b in batches]


def evaluate(config, variables: dict, batches) -> float:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from effjax import state as state_lib, train  # pylint: disable=import-outside-toplevel

  setup = state_lib.make_setup(config, with_optimizer=False, devices=jax.devices()[:1])
  params = variables['params']
  extra = {k: v for k, v in variables.items() if k != 'params'}
  st = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=None, extra=extra)
  return train.evaluate_loss(setup, st, batches)


def finetune(config, variables: dict, bundle, steps: int, lr: float, seed: int = 1) -> dict:
  """`steps` steps of effjax's train step from `variables` (fresh AdamW state); returns the new variables."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import ml_collections  # pylint: disable=import-outside-toplevel
  from effjax import sharding, state as state_lib, train  # pylint: disable=import-outside-toplevel
  from effjax.data import pipeline  # pylint: disable=import-outside-toplevel

  if steps <= 0:
    return variables
  c = ml_collections.ConfigDict(config.to_dict())
  c.train.update(steps=steps, lr=lr, warmup_steps=max(steps // 10, 1), lr_schedule='cosine')
  c.seed = config.seed + seed
  setup = state_lib.make_setup(c, devices=jax.devices()[:1])
  # The train step donates its state: give it copies so the caller's (unpruned) arrays stay alive.
  fresh = lambda tree, shardings: jax.device_put(jax.tree.map(lambda x: jnp.array(x, copy=True), tree), shardings)
  params = fresh(variables['params'], setup.state_shardings.params)
  extra = fresh({k: v for k, v in variables.items() if k != 'params'}, setup.state_shardings.extra)
  st = state_lib.TrainState(
    step=jnp.zeros((), jnp.int32), params=params, opt_state=setup.optimizer.init(params), extra=extra
  )
  step_fn = train.make_train_step(setup, c)
  it = pipeline.make_train_iterator(
    bundle.train_tokens, seq_len=c.data.seq_len, batch_size=c.train.batch_size, seed=c.seed
  )
  for _ in range(steps):
    st, m = step_fn(st, sharding.global_batch(next(it), setup.batch_sharding))
  loss = float(m['loss'])
  if not np.isfinite(loss):
    raise FloatingPointError(f'fine-tune diverged (loss {loss})')
  return st.variables()


# ---------------------------------------------------------------------------------------------------- study
def study(
  config, workdir: str, finetune_steps: int, finetune_lr: float, ks=None, train_fn=None, progress: bool | None = None
) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  from effjax import train  # pylint: disable=import-outside-toplevel

  progress = sys.stderr.isatty() if progress is None else progress
  if not os.path.exists(os.path.join(workdir, 'config.json')) or config is not None:
    if config is None:
      config = default_config()
    (train_fn or train.train_and_evaluate)(config, workdir, devices=jax.devices()[:1], progress=progress)
  config, state, bundle = load_trained(config, workdir)
  if int(state.step) < config.train.steps:
    raise SystemExit(
      f'the run in {workdir} stopped at step {int(state.step)} of {config.train.steps}; rerun to finish it'
    )
  L = config.model.num_layers
  ks = list(range(L)) if ks is None else list(ks)
  path = os.path.join(workdir, 'prune_results.json')
  done = {}
  if os.path.exists(path):
    with open(path, encoding='utf-8') as f:
      saved = json.load(f)
    if saved.get('finetune_steps') == finetune_steps and saved.get('finetune_lr') == finetune_lr:
      done = {int(k): v for k, v in saved['rows'].items()}
  batches = val_batches(config, bundle)
  variables = state.variables()
  start = time.time()
  todo = [k for k in ks if k not in done]
  for i, k in enumerate(todo):
    eta = '' if not i else f', ETA {(time.time() - start) / i * (len(todo) - i) / 60:.1f} min'
    print(f'[{i + 1}/{len(todo)}] removing the last {k} of {L} blocks{eta}', flush=True)
    pcfg, pvars = prune(config, variables, k)
    before = evaluate(pcfg, pvars, batches)
    tuned = finetune(pcfg, pvars, bundle, finetune_steps, finetune_lr)
    after = evaluate(pcfg, tuned, batches)
    done[k] = dict(k=k, layers_kept=L - k, fraction_kept=(L - k) / L, loss_before=before, loss_after=after)
    print(f'  k={k}: val loss {before:.4f} -> {after:.4f} after {finetune_steps} fine-tune steps', flush=True)
    with open(path + '.tmp', 'w', encoding='utf-8') as f:
      json.dump(
        dict(
          finetune_steps=finetune_steps, finetune_lr=finetune_lr, rows={str(kk): v for kk, v in sorted(done.items())}
        ),
        f,
        indent=1,
      )
    os.replace(path + '.tmp', path)
  rows = [done[k] for k in sorted(done) if k in ks]
  return dict(
    rows=rows,
    num_layers=L,
    finetune_steps=finetune_steps,
    finetune_lr=finetune_lr,
    model=dict(
      d_model=config.model.d_model,
      num_heads=config.model.num_heads,
      train_steps=config.train.steps,
      seq_len=config.data.seq_len,
      tokenizer=config.data.tokenizer,
      vocab_size=config.model.vocab_size,
      batch_size=config.train.batch_size,
    ),
  )


def summarize(res: dict, tolerance: float = 0.01) -> dict:
  """How many blocks can go with the fine-tuned loss within `tolerance` (relative) of the fine-tuned control."""
  rows = {r['k']: r for r in res['rows']}
  if 0 not in rows:
    return {}
  ref = rows[0]['loss_after']
  ok = [k for k, r in rows.items() if r['loss_after'] <= ref * (1 + tolerance)]
  # the largest k such that every k' <= k stays within tolerance
  k_max = 0
  while k_max + 1 in rows and k_max + 1 in ok:
    k_max += 1
  ok_before = [k for k, r in rows.items() if r['loss_before'] <= rows[0]['loss_before'] * (1 + tolerance)]
  kb = 0
  while kb + 1 in rows and kb + 1 in ok_before:
    kb += 1
  L = res['num_layers']
  return dict(
    tolerance=tolerance,
    reference_loss_after=ref,
    max_removable_after_finetune=k_max,
    max_removable_fraction_after_finetune=k_max / L,
    max_removable_before_finetune=kb,
    loss_increase_at_30pct={k: rows[k]['loss_after'] / ref - 1 for k in rows if abs(k / L - 0.3) <= 0.5 / L + 1e-9}
    or None,
  )


def plot(res: dict, path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  rows = res['rows']
  x = [r['fraction_kept'] for r in rows]
  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  ax.plot(x, [r['loss_before'] for r in rows], 'o-', color='tab:red', label='pruned, no fine-tune')
  ax.plot(
    x,
    [r['loss_after'] for r in rows],
    's-',
    color='tab:blue',
    label=f'pruned + {res["finetune_steps"]} fine-tune steps',
  )
  ref = next((r for r in rows if r['k'] == 0), None)
  if ref:
    ax.axhline(ref['loss_after'], color='gray', ls='--', lw=1, label='unpruned + same fine-tune (control)')
  ax.axvline(0.7, color='k', ls=':', lw=1, label='70% kept (seed: last ~30% removable)')
  ax.set_xlabel(f'fraction of the {res["num_layers"]} blocks kept (last blocks removed)')
  ax.set_ylabel('validation loss (nats / token)')
  ax.set_yscale('log')
  ax.grid(True, which='both', alpha=0.3)
  ax.legend(fontsize=8)
  ax.set_title('Removing the last blocks of a trained GPT')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def markdown(res: dict, summary: dict, png: str, meta: str) -> str:
  m = res['model']
  lines = [
    f'# Layer pruning: {res["num_layers"]}-block GPT',
    '',
    f'd_model {m["d_model"]}, {m["num_heads"]} heads, ctx {m["seq_len"]}, {m["tokenizer"]} vocab '
    f'{m["vocab_size"]}, trained {m["train_steps"]} steps at batch {m["batch_size"]}; fine-tune '
    f'{res["finetune_steps"]} steps at lr {res["finetune_lr"]}. {meta}',
    '',
    '| blocks removed k | blocks kept | fraction kept | val loss, pruned | val loss, pruned + fine-tune | '
    'vs fine-tuned unpruned |',
    '|---:|---:|---:|---:|---:|---:|',
  ]
  ref = next((r['loss_after'] for r in res['rows'] if r['k'] == 0), None)
  for r in res['rows']:
    rel = f'{100 * (r["loss_after"] / ref - 1):+.1f}%' if ref else ''
    lines.append(
      f'| {r["k"]} | {r["layers_kept"]} | {r["fraction_kept"]:.3f} | {r["loss_before"]:.4f} | '
      f'{r["loss_after"]:.4f} | {rel} |'
    )
  if summary:
    lines += [
      '',
      f'Within {100 * summary["tolerance"]:.0f}% of the fine-tuned unpruned model: up to '
      f'{summary["max_removable_after_finetune"]} of {res["num_layers"]} blocks '
      f'({100 * summary["max_removable_fraction_after_finetune"]:.0f}%) after the fine-tune, '
      f'{summary["max_removable_before_finetune"]} without it.',
    ]
  lines += ['', f'![{os.path.basename(png)}]({os.path.basename(png)})', '']
  return '\n'.join(lines)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--workdir', default='experiments/runs/prune/base')
  p.add_argument('--finetune_steps', type=int, default=150)
  p.add_argument('--finetune_lr', type=float, default=5e-4)
  p.add_argument('--name', default='gpt8', help='results go to experiments/results/prune_<name>.*')
  p.add_argument('--out_dir', default=RESULTS)
  p.add_argument('--reuse', action='store_true', help='use the run already in --workdir as is (its config.json)')
  args = p.parse_args(argv)
  t0, load0 = time.time(), os.getloadavg()[0]
  config = None if args.reuse else default_config()
  if config is not None:
    from experiments import scaling  # pylint: disable=import-outside-toplevel

    shared = os.path.join('experiments', 'runs', 'cpu')
    if os.path.isdir(shared):
      scaling._seed_data_cache(shared, args.workdir)  # pylint: disable=protected-access
  try:
    res = study(config, args.workdir, args.finetune_steps, args.finetune_lr)
  except KeyboardInterrupt:
    print('interrupted; rerun the same command to resume', flush=True)
    return {}
  summary = summarize(res)
  os.makedirs(args.out_dir, exist_ok=True)
  prefix = os.path.join(args.out_dir, f'prune_{args.name}')
  plot(res, prefix + '.png')
  meta = f'Wall time {time.time() - t0:.0f} s on a shared 2-core CPU (load average {load0:.1f} at start).'
  md = markdown(res, summary, prefix + '.png', meta)
  with open(prefix + '.md', 'w', encoding='utf-8') as f:
    f.write(md)
  with open(prefix + '.json', 'w', encoding='utf-8') as f:
    json.dump(dict(**res, summary=summary, meta=meta), f, indent=1)
  print(md)
  return dict(res, summary=summary)


if __name__ == '__main__':
  main()
