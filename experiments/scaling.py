"""Scaling-law harness (seed 004, LightOn): `python -m experiments.scaling [--sweep cpu] [--root DIR]`.

On 2 cores the 'cpu' sweep runs fastest as two processes, `--shard 0/2` and `--shard 1/2` (each trains its half,
balanced by cost), followed by `--analyse_only` (fits, per-seed comparisons, plots and the results files).

A sweep is a list of runs (family x size x steps). Each run is an ordinary effjax training run
(`train.train_and_evaluate`) in its own workdir `<root>/<name>` (default root experiments/runs, git-ignored);
when it finishes, `<root>/<name>/result.json` records its parameter counts, compute per step under both
accountings and its evaluation curve. A rerun skips finished runs and resumes an interrupted one from its last
checkpoint, so Ctrl-C (which effjax turns into "checkpoint and stop") and rerunning the same command is safe.

Then it fits power laws with scipy.optimize.curve_fit (1-sigma uncertainties from the covariance):
  L(N)  final validation loss of the baselines vs trainable non-embedding params N;
  L(C)  the compute frontier of the baselines (the eval points no cheaper point beats) vs compute C = 6·N·B·S;
both as L = a·X^(-b) and, where the fit converges, L = c + a·X^(-b) (c the irreducible loss). It plots loss vs
trainable params and vs total/emulated params (with the baseline L(N) fit), and the eval curves vs compute under
both accountings (frozen weights at 2/3 of a trainable one: C = (6·N_trainable + 4·N_frozen)·B·S, metrics'
'compute'; and frozen weights free: 6·N_trainable·B·S, 'compute_frozen_free') with the baseline frontier fit.
The seed's question, "does loss depend only on the trainable parameters?", becomes: how far is each doped /
structured run from the baseline L(N) fit when N counts only trainable parameters, and when it counts all of them.

Outputs: experiments/results/scaling_<sweep>.{json,md}, scaling_<sweep>_params.png, scaling_<sweep>_compute.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time

import numpy as np

from experiments import report  # the report's mean ± 2 SE rule

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')
FAMILY_STYLE = {  # family: (colour, marker)
  'baseline': ('black', 'o'),
  'doped': ('tab:red', 's'),
  'fastfood': ('tab:blue', '^'),
  'blockdiag': ('tab:green', 'D'),
}


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  family: str  # 'baseline' | 'doped' | 'fastfood' | 'blockdiag'
  layers: int  # trainable blocks (doped: frozen MLPs are interleaved between them)
  d_model: int
  steps: int
  model: tuple = ()  # extra model.* overrides as (key, value) pairs
  seed: int = 0


FAMILY_MODEL = {
  'baseline': {},
  'doped': {'doping': {'pattern': 'interleave', 'frozen_mlp_ratio': 6}},
  'fastfood': {'mlp_kind': 'fastfood'},
  # the seed's Figure 5: two block-diagonal matrices, ONE block-Hadamard transform per MLP
  'blockdiag': {'mlp_kind': 'blockdiag', 'dense': {'num_blocks': 4, 'blockdiag_mix': 'expanding'}},
}
STEPS = 300  # chosen from a timing estimate to fit one hour on 2 cores; the 66 runs took 49 min as two shards


SIZES = ((2, 48), (2, 64), (2, 96), (3, 128), (4, 160))  # (trainable blocks, d_model) of every kind
SMALL_BASELINES = ((2, 24), (2, 32))  # below every structured model's trainable N: the L(N) fit interpolates
SEEDS = (0, 1, 2)


def sweep_runs(sweep: str, steps: int | None = None) -> list[Run]:
  """The sweep definitions. 'cpu': the seed's comparison at CPU scale, sized to one hour on 2 cores: the four
  kinds (baseline, doped, FastFood, seed-faithful block-diagonal) at the same five shapes, plus two smaller
  baselines so that every structured model's trainable N lies inside the baselines' range, each on 3 seeds
  (the doped model's trainable blocks ARE the baseline of its shape: the width-matched pair at equal trainable N).
  'quick': two tiny runs (tests)."""
  if sweep == 'quick':
    s = steps or 12
    return [Run('baseline-1x32', 'baseline', 1, 32, s), Run('baseline-2x32', 'baseline', 2, 32, s)]
  if sweep != 'cpu':
    raise SystemExit(f'unknown sweep {sweep!r}; valid: cpu, quick')
  s = steps or STEPS
  grid = [('baseline', layers, d) for layers, d in SMALL_BASELINES]
  grid += [(fam, layers, d) for layers, d in SIZES for fam in FAMILY_MODEL]
  return [
    Run(f'{fam}-{layers}x{d}' + (f'-seed{seed}' if seed else ''), fam, layers, d, s, seed=seed)
    for seed in SEEDS
    for fam, layers, d in grid
  ]


def base_config(sweep: str):
  """The training recipe every run of a sweep shares: rotary GPT, BPE on the embedded corpus, AdamW + cosine."""
  from effjax.configs import gpt as gpt_config  # pylint: disable=import-outside-toplevel

  c = gpt_config.get_config('')
  c.model.update(pos_emb='rotary', max_len=64, dropout=0.0, attn_dropout=0.0)
  c.data.update(corpus='embedded', tokenizer='bpe', bpe_vocab_size=1024, seq_len=64, max_bytes=3_000_000)
  c.train.update(batch_size=16, lr=2e-3, warmup_steps=40, weight_decay=0.0, grad_clip=1.0, eval_batches=8)
  c.checkpoint.keep = 1
  if sweep == 'quick':
    c.model.max_len = 16
    c.data.update(seq_len=16, bpe_vocab_size=300, max_bytes=200_000)
    c.train.update(batch_size=4, warmup_steps=2, eval_batches=2)
  return c


def run_config(run: Run, sweep: str, corpus: str | None = None):
  c = base_config(sweep)
  if corpus:
    c.data.corpus = corpus
  if run.seed:
    c.seed = run.seed
  c.model.update(
    num_layers=run.layers,
    d_model=run.d_model,
    num_heads=max(run.d_model // 32, 1),
    **FAMILY_MODEL[run.family],
    **dict(run.model),
  )
  evals = 6 if run.steps >= 60 else 2
  c.train.update(steps=run.steps, log_every=max(run.steps // evals, 1), eval_every=max(run.steps // evals, 1))
  c.checkpoint.every = max(run.steps // 3, 1)
  return c


def config_hash(config) -> str:
  return hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------- running
def read_result(workdir: str) -> dict | None:
  path = os.path.join(workdir, 'result.json')
  if not os.path.exists(path):
    return None
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def finish_run(run: Run, config, workdir: str) -> dict | None:
  """result.json from a finished workdir (None if the run has not reached its last step)."""
  from effjax import accounting, metrics as metrics_lib  # pylint: disable=import-outside-toplevel

  records = metrics_lib.read_metrics(workdir)
  evals = {}
  for r in records:
    if r['split'] == 'eval':
      evals[r['step']] = r  # a resumed run may log a step twice: keep the last
  if config.train.steps not in evals:
    return None
  with open(os.path.join(workdir, 'config.json'), encoding='utf-8') as f:
    resolved = json.load(f)  # model.vocab_size filled in from the tokenizer
  import ml_collections  # pylint: disable=import-outside-toplevel

  resolved = ml_collections.ConfigDict(resolved)
  counts = accounting.param_counts(resolved.model)
  emulated = accounting.emulated_params(resolved.model)
  step_c = accounting.step_compute(resolved)
  tokens = resolved.train.batch_size * resolved.data.seq_len
  curve = [
    dict(
      step=s,
      loss=r['loss'],
      bpb=r.get('bpb'),
      tokens=s * tokens,
      compute=s * step_c['compute'],
      compute_frozen_free=s * step_c['compute_frozen_free'],
    )
    for s, r in sorted(evals.items())
  ]
  final = evals[config.train.steps]
  result = dict(
    name=run.name,
    family=run.family,
    seed=run.seed,
    layers=run.layers,
    d_model=run.d_model,
    steps=run.steps,
    config_hash=config_hash(config),
    **counts,
    emulated_params=emulated,
    emulated_non_embedding_params=emulated - counts['embedding_params'],
    non_embedding_total_params=counts['total_params'] - counts['embedding_params'],
    step_compute=step_c['compute'],
    step_compute_frozen_free=step_c['compute_frozen_free'],
    tokens_per_step=tokens,
    final_loss=final['loss'],
    final_bpb=final.get('bpb'),
    curve=curve,
    train_tokens_per_sec=_median(
      [r['tokens_per_sec'] for r in records if r['split'] == 'train' and 'tokens_per_sec' in r]
    ),
  )
  with open(os.path.join(workdir, 'result.json.tmp'), 'w', encoding='utf-8') as f:
    json.dump(result, f, indent=1)
  os.replace(os.path.join(workdir, 'result.json.tmp'), os.path.join(workdir, 'result.json'))
  return result


def _median(xs):
  return float(np.median(xs)) if xs else float('nan')


def _seed_data_cache(root: str, workdir: str) -> None:
  """Every run of a sweep tokenizes the same corpus: copy the first run's cache instead of re-training BPE."""
  shared, mine = os.path.join(root, '_data'), os.path.join(workdir, 'data')
  if os.path.exists(os.path.join(shared, 'manifest.json')) and not os.path.exists(mine):
    shutil.copytree(shared, mine)


def _publish_data_cache(root: str, workdir: str) -> None:
  shared, mine = os.path.join(root, '_data'), os.path.join(workdir, 'data')
  if not os.path.exists(os.path.join(shared, 'manifest.json')) and os.path.exists(os.path.join(mine, 'manifest.json')):
    tmp = f'{shared}.tmp{os.getpid()}'
    shutil.copytree(mine, tmp)
    try:
      os.replace(tmp, shared)
    except OSError:  # another shard published the same cache first
      shutil.rmtree(tmp)


def run_sweep(
  runs: list[Run], root: str, sweep: str, corpus: str | None = None, progress: bool | None = None, train_fn=None
) -> tuple[list[dict], bool]:
  """Runs what is not finished yet; returns (results of finished runs, whether every run finished)."""
  import jax  # pylint: disable=import-outside-toplevel
  from effjax import train  # pylint: disable=import-outside-toplevel

  train_fn = train_fn or train.train_and_evaluate
  progress = sys.stderr.isatty() if progress is None else progress
  os.makedirs(root, exist_ok=True)
  results, todo = {}, []
  for run in runs:
    config = run_config(run, sweep, corpus)
    workdir = os.path.join(root, run.name)
    done = read_result(workdir)
    if done is not None and done.get('config_hash') != config_hash(config):
      raise SystemExit(f'{workdir} holds a finished run of a different configuration; delete it or use another --root')
    if done is not None:
      results[run.name] = done
    else:
      todo.append((run, config, workdir))
  print(
    f'sweep {sweep!r}: {len(runs)} runs, {len(results)} already finished, {len(todo)} to run (root {root})', flush=True
  )
  weights = [c.train.steps * (_step_cost(c) + 2e8) for _, c, _ in todo]  # + a fixed per-step overhead
  start, spent = time.time(), 0.0
  for i, ((run, config, workdir), weight) in enumerate(zip(todo, weights)):
    elapsed = time.time() - start
    eta = '' if not spent else f', ETA {elapsed / spent * sum(weights[i:]) / 60:.1f} min'
    print(f'[run {i + 1}/{len(todo)}] {run.name} ({config.train.steps} steps){eta}', flush=True)
    _seed_data_cache(root, workdir)
    t0 = time.time()
    try:
      train_fn(config, workdir, devices=jax.devices()[:1], progress=progress)
    except KeyboardInterrupt:
      print(f'interrupted during {run.name}; rerun the same command to resume', flush=True)
      return list(results.values()), False
    _publish_data_cache(root, workdir)
    result = finish_run(run, config, workdir)
    if result is None:  # effjax caught SIGINT/SIGTERM, saved a checkpoint and returned early
      print(f'{run.name} stopped before its last step (checkpoint saved); rerun the same command to resume', flush=True)
      return list(results.values()), False
    results[run.name] = result
    spent += weight
    print(f'  {run.name}: loss {result["final_loss"]:.4f} in {time.time() - t0:.0f}s', flush=True)
  return [results[r.name] for r in runs], True


def shard(runs: list[Run], sweep: str, spec: str) -> list[Run]:
  """Part i of n ('i/n') of the runs, balanced by estimated cost (largest first, each to the lightest part), so
  that n processes can share the machine; each trains its part, then `--analyse_only` fits them all."""
  try:
    i, n = (int(x) for x in spec.split('/'))
    assert 0 <= i < n
  except (ValueError, AssertionError):
    raise SystemExit(f'--shard={spec!r} is invalid; expected i/n with 0 <= i < n, e.g. 0/2') from None
  cost = {r.name: r.steps * (_step_cost(run_config(r, sweep)) + 2e8) for r in runs}
  parts, loads = [[] for _ in range(n)], [0.0] * n
  for r in sorted(runs, key=lambda r: -cost[r.name]):
    j = loads.index(min(loads))
    parts[j].append(r)
    loads[j] += cost[r.name]
  return [r for r in runs if r in parts[i]]


def _step_cost(config) -> float:
  from effjax import accounting  # pylint: disable=import-outside-toplevel
  import ml_collections  # pylint: disable=import-outside-toplevel

  m = ml_collections.ConfigDict(config.model.to_dict())
  m.vocab_size = m.vocab_size or config.data.bpe_vocab_size  # 0 = from the tokenizer: estimate with the target
  return 3 * accounting.flops_per_token(m, config.data.seq_len) * config.train.batch_size * config.data.seq_len


# ------------------------------------------------------------------------------------------------- fitting
def power_law(x, a, b):
  return a * np.power(x, -b)


def power_law_offset(x, a, b, c):
  return c + a * np.power(x, -b)


def fit_power_law(x, y, irreducible: bool = False) -> dict | None:
  """L = a·x^(-b) (fitted as a line in log-log space), or L = c + a·x^(-b); values with 1-sigma errors.

  Returns None when there are too few points or the fit does not converge."""
  from scipy import optimize  # pylint: disable=import-outside-toplevel

  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if len(x) < (4 if irreducible else 3):
    return None
  try:
    if not irreducible:
      line = lambda lx, log_a, b: log_a - b * lx
      (log_a, b), cov = optimize.curve_fit(line, np.log(x), np.log(y), p0=(np.log(y[0]), 0.1))
      err = np.sqrt(np.diag(cov))
      resid = np.log(y) - line(np.log(x), log_a, b)
      return dict(
        a=float(np.exp(log_a)),
        a_err=float(np.exp(log_a) * err[0]),
        b=float(b),
        b_err=float(err[1]),
        c=0.0,
        c_err=0.0,
        exponent=-float(b),
        rms_log_residual=float(np.sqrt(np.mean(resid**2))),
        n=len(x),
        form='a*x^-b',
      )
    x0 = np.exp(np.mean(np.log(x)))  # fit in x / x0 for conditioning
    p0 = (float(y.max() - 0.9 * y.min()), 0.3, 0.9 * float(y.min()))
    (a, b, c), cov = optimize.curve_fit(
      power_law_offset, x / x0, y, p0=p0, bounds=([0, 0, 0], [np.inf, 5, float(y.min())]), maxfev=20000
    )
    err = np.sqrt(np.diag(cov))
    if not np.all(np.isfinite(err)):
      return None
    resid = np.log(y) - np.log(power_law_offset(x / x0, a, b, c))
    return dict(
      a=float(a * x0**b),
      a_err=float(err[0] * x0**b),
      b=float(b),
      b_err=float(err[1]),
      c=float(c),
      c_err=float(err[2]),
      exponent=-float(b),
      rms_log_residual=float(np.sqrt(np.mean(resid**2))),
      n=len(x),
      form='c+a*x^-b',
    )
  except (RuntimeError, ValueError, optimize.OptimizeWarning):
    return None


def predict(fit: dict, x):
  return fit['c'] + fit['a'] * np.power(np.asarray(x, np.float64), -fit['b'])


def pareto_frontier(points) -> list[tuple[float, float]]:
  """(compute, loss) points that no point with less or equal compute beats."""
  out, best = [], math.inf
  for c, loss in sorted(points):
    if loss < best:
      out.append((c, loss))
      best = loss
  return out


def analyse(results: list[dict], warmup_steps: int = 40, reps: int = 1000) -> dict:
  """The pooled fits and every run against them, each seed on its own (`per_seed`) and bootstrap intervals of
  the baselines' exponents over runs (`bootstrap`)."""
  out = fit_and_compare(results, warmup_steps)
  out['per_seed'] = per_seed(results, warmup_steps)
  out['bootstrap'] = bootstrap_exponents(results, warmup_steps, reps)
  return out


def fit_and_compare(results: list[dict], warmup_steps: int = 40) -> dict:
  base = [r for r in results if r['family'] == 'baseline']
  n = [r['non_embedding_trainable_params'] for r in base]
  loss = [r['final_loss'] for r in base]
  fits = {'L(N)': fit_power_law(n, loss), 'L(N)+c': fit_power_law(n, loss, irreducible=True)}
  for key in ('compute', 'compute_frozen_free'):  # identical for baselines (no frozen weights)
    pts = [(p[key], p['loss']) for r in base for p in r['curve'] if p['step'] > warmup_steps]
    front = pareto_frontier(pts)
    fits[f'L(C) {key}'] = fit_power_law(*zip(*front)) if len(front) >= 3 else None
    fits[f'L(C)+c {key}'] = fit_power_law(*zip(*front), irreducible=True) if len(front) >= 4 else None
    fits[f'frontier {key}'] = front
  # How far each run lies from the baseline L(N) fit, with N = trainable or all (emulated) params; and, free of
  # any functional form, from the baselines' losses interpolated in log-log space at its trainable N.
  deviations = []
  ln = fits['L(N)']
  lc = fits['L(C) compute']
  interp = baseline_interpolation(base)
  log_n, log_loss = np.log(np.asarray(interp)).T if interp else (None, None)
  for r in results:
    row = dict(
      name=r['name'],
      family=r['family'],
      final_loss=r['final_loss'],
      trainable=r['non_embedding_trainable_params'],
      total=r['non_embedding_total_params'],
      emulated=r['emulated_non_embedding_params'],
    )
    if ln:
      row['vs_L(N)_trainable'] = r['final_loss'] / float(predict(ln, row['trainable'])) - 1
      row['vs_L(N)_all'] = r['final_loss'] / float(predict(ln, max(row['emulated'], row['total']))) - 1
    if interp and interp[0][0] <= row['trainable'] <= interp[-1][0]:
      row['vs_baselines_interpolated'] = (
        r['final_loss'] / float(np.exp(np.interp(np.log(row['trainable']), log_n, log_loss))) - 1
      )
    if lc:
      final = r['curve'][-1]
      row['vs_L(C)_compute'] = r['final_loss'] / float(predict(lc, final['compute'])) - 1
      row['vs_L(C)_frozen_free'] = r['final_loss'] / float(predict(lc, final['compute_frozen_free'])) - 1
    deviations.append(row)
  return dict(fits=fits, deviations=deviations)


def baseline_interpolation(base: list[dict]) -> list[tuple[float, float]]:
  """(N, mean final loss) of the baselines at each trainable N, sorted by N: the points to interpolate between."""
  by_n = {}
  for r in base:
    by_n.setdefault(r['non_embedding_trainable_params'], []).append(r['final_loss'])
  return [(n, float(np.mean(v))) for n, v in sorted(by_n.items())]


DEVIATIONS = (
  'vs_L(N)_trainable',
  'vs_baselines_interpolated',
  'vs_L(N)_all',
  'vs_L(C)_compute',
  'vs_L(C)_frozen_free',
)


def per_seed(results: list[dict], warmup_steps: int = 40) -> dict:
  """Each seed analysed alone: its baselines fitted, its other runs measured against those fits and averaged over
  each kind's sizes, and each doped run against the baseline of its shape (the same trainable blocks). One number
  per seed and kind, so differences get mean ± 2 SE over seeds (the report's rule); no run is used twice."""
  out = {}
  for seed in sorted({r.get('seed', 0) for r in results}):
    rs = [r for r in results if r.get('seed', 0) == seed]
    a = fit_and_compare(rs, warmup_steps)
    base = {(r['layers'], r['d_model']): r['final_loss'] for r in rs if r['family'] == 'baseline'}
    kinds = {}
    for fam in sorted({r['family'] for r in rs} - {'baseline'}):
      devs = [x for x in a['deviations'] if x['family'] == fam]
      kinds[fam] = {k: float(np.mean([x[k] for x in devs])) for k in DEVIATIONS if all(k in x for x in devs)}
    out[str(seed)] = dict(
      exponents={k: (a['fits'][k] or {}).get('exponent') for k in ('L(N)', 'L(C) compute')},
      kinds=kinds,
      doped_vs_same_blocks={
        f'{r["layers"]}x{r["d_model"]}': r['final_loss'] / base[(r['layers'], r['d_model'])] - 1
        for r in rs
        if r['family'] == 'doped' and (r['layers'], r['d_model']) in base
      },
    )
  return out


def bootstrap_exponents(results: list[dict], warmup_steps: int = 40, reps: int = 1000, seed: int = 0) -> dict:
  """Pure power-law exponents of the baselines refitted on runs resampled with replacement within each size (over
  runs, not over the eval points of one run; with one run per size there is nothing to resample); 95 % percentile
  intervals. L(N): final losses; L(C): the Pareto frontier of the resampled runs' eval curves after warm-up."""
  by_size = {}
  for r in results:
    if r['family'] == 'baseline':
      by_size.setdefault(r['non_embedding_trainable_params'], []).append(r)
  if len(by_size) < 3:
    return {}
  rng = np.random.default_rng(seed)
  slope = lambda x, y: float(np.polyfit(np.log(x), np.log(y), 1)[0])
  exps = {'L(N)': [], 'L(C)': []}
  for _ in range(reps):
    pick = [runs[i] for runs in by_size.values() for i in rng.integers(0, len(runs), len(runs))]
    exps['L(N)'].append(slope([r['non_embedding_trainable_params'] for r in pick], [r['final_loss'] for r in pick]))
    front = pareto_frontier({(p['compute'], p['loss']) for r in pick for p in r['curve'] if p['step'] > warmup_steps})
    if len(front) >= 3:
      exps['L(C)'].append(slope(*zip(*front)))
  runs = sum(len(v) for v in by_size.values())
  return {
    k: dict(
      lo=float(np.percentile(v, 2.5)), hi=float(np.percentile(v, 97.5)), reps=len(v), runs=runs, sizes=len(by_size)
    )
    for k, v in exps.items()
    if v
  }


# ------------------------------------------------------------------------------------------------ plotting
def _plot_loss_vs_params(plt, results: list[dict], fits: dict, path: str) -> str:
  """Loss against trainable and against all parameters, with the baseline L(N) fit."""
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
  for ax, key, title in (
    (axes[0], 'non_embedding_trainable_params', 'trainable non-embedding params'),
    (axes[1], 'all', 'all non-embedding params (frozen + emulated dense)'),
  ):
    for fam, (colour, marker) in FAMILY_STYLE.items():
      rs = [r for r in results if r['family'] == fam]
      if not rs:
        continue
      xs = [
        r[key] if key != 'all' else max(r['emulated_non_embedding_params'], r['non_embedding_total_params']) for r in rs
      ]
      ax.scatter(xs, [r['final_loss'] for r in rs], c=colour, marker=marker, label=fam, zorder=3)
      for x, r in zip(xs, rs):
        if r.get('seed', 0):  # one label per shape
          continue
        ax.annotate(
          r['name'].split('-', 1)[1], (x, r['final_loss']), fontsize=7, xytext=(3, 3), textcoords='offset points'
        )
    if fits.get('L(N)'):
      f = fits['L(N)']
      allx = [r['non_embedding_trainable_params'] for r in results] + [
        max(r['emulated_non_embedding_params'], r['non_embedding_total_params']) for r in results
      ]
      grid = np.geomspace(min(allx) * 0.8, max(allx) * 1.2, 50)
      ax.plot(grid, predict(f, grid), 'k--', lw=1, label=f'baseline fit L ∝ N^({f["exponent"]:.3f}±{f["b_err"]:.3f})')
    ax.set_xscale('log')
    ax.set_yscale('log')
    ax.set_xlabel(title)
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(fontsize=8)
  axes[0].set_ylabel('final validation loss (nats / BPE token)')
  fig.suptitle('Loss vs parameters: does only the trainable count matter?')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def _plot_loss_vs_compute(plt, results: list[dict], fits: dict, path: str) -> str:
  """Loss curves against compute under both accountings, with the baseline frontier fit."""
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
  for ax, key, title in (
    (axes[0], 'compute', 'compute, frozen weights at 2/3 cost (FLOPs)'),
    (axes[1], 'compute_frozen_free', 'compute, frozen weights free (FLOPs)'),
  ):
    for r in results:
      colour, marker = FAMILY_STYLE[r['family']]
      xs, ys = [p[key] for p in r['curve']], [p['loss'] for p in r['curve']]
      ax.plot(
        xs,
        ys,
        color=colour,
        marker=marker,
        ms=3,
        lw=1,
        alpha=0.5 if r['family'] == 'baseline' else 0.9,
        ls='-' if r['family'] != 'baseline' else ':',
      )
      if r.get('seed', 0):  # one label per shape
        continue
      ax.annotate(
        r['name'].split('-', 1)[1],
        (xs[-1], ys[-1]),
        fontsize=7,
        color=colour,
        xytext=(3, 0),
        textcoords='offset points',
      )
    f = fits.get(f'L(C) {key}')
    front = fits.get(f'frontier {key}') or []
    if front:
      ax.scatter(*zip(*front), facecolors='none', edgecolors='k', s=30, label='baseline frontier points')
    if f:
      grid = np.geomspace(min(c for c, _ in front) * 0.5, max(c for c, _ in front) * 2, 50)
      ax.plot(grid, predict(f, grid), 'k--', lw=1.2, label=f'frontier fit L ∝ C^({f["exponent"]:.3f}±{f["b_err"]:.3f})')
    for fam, (colour, marker) in FAMILY_STYLE.items():
      if any(r['family'] == fam for r in results):
        ax.plot([], [], color=colour, marker=marker, label=fam)
    ax.set_xscale('log')
    ax.set_yscale('log')
    ax.set_xlabel(title)
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(fontsize=8)
  axes[0].set_ylabel('validation loss (nats / BPE token)')
  fig.suptitle('Loss vs training compute C = (6·N_trainable + k·N_frozen)·tokens, non-embedding')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def plot(results: list[dict], analysis: dict, prefix: str) -> list[str]:
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fits = analysis['fits']
  return [
    _plot_loss_vs_params(plt, results, fits, prefix + '_params.png'),
    _plot_loss_vs_compute(plt, results, fits, prefix + '_compute.png'),
  ]


# ------------------------------------------------------------------------------------------------- reports
def _fmt_fit(f) -> str:
  if not f:
    return 'did not converge / too few points'
  s = f'exponent {f["exponent"]:.4f} ± {f["b_err"]:.4f} (a = {f["a"]:.3g})'
  if f['form'] != 'a*x^-b':
    s += f', irreducible c = {f["c"]:.3f} ± {f["c_err"]:.3f}'
  return s + f', rms log residual {f["rms_log_residual"]:.4f}, {f["n"]} points'


def markdown(results: list[dict], analysis: dict, sweep: str, plots: list[str], meta: dict) -> str:
  fits = analysis['fits']
  lines = [
    f'# Scaling sweep `{sweep}`',
    '',
    f'{meta["note"]}',
    '',
    '| run | family | trainable non-emb params | frozen params | emulated non-emb params | steps | tokens | '
    'compute (frozen 2/3) | compute (frozen free) | final val loss | bpb | train tokens/s |',
    '|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|',
  ]
  for r in results:
    last = r['curve'][-1]
    lines.append(
      f'| {r["name"]} | {r["family"]} | {r["non_embedding_trainable_params"]:,} | {r["frozen_params"]:,} '
      f'| {r["emulated_non_embedding_params"]:,} | {r["steps"]} | {last["tokens"]:,} | '
      f'{last["compute"]:.3g} | {last["compute_frozen_free"]:.3g} | {r["final_loss"]:.4f} | '
      f'{r["final_bpb"]:.4f} | {r["train_tokens_per_sec"]:,.0f} |'
    )
  lines += [
    '',
    '## Fits (baselines)',
    '',
    f'- L(N), final loss vs trainable non-embedding params: {_fmt_fit(fits.get("L(N)"))}',
    f'- L(N) with irreducible term: {_fmt_fit(fits.get("L(N)+c"))}',
    f'- L(C), compute frontier: {_fmt_fit(fits.get("L(C) compute"))}',
    f'- L(C) with irreducible term: {_fmt_fit(fits.get("L(C)+c compute"))}',
    *(
      f'- {k} exponent, 95 % bootstrap over runs (resampled within each size, {b["reps"]} resamples of {b["runs"]} '
      f'runs at {b["sizes"]} sizes): [{b["lo"]:.4f}, {b["hi"]:.4f}]'
      for k, b in (analysis.get('bootstrap') or {}).items()
    ),
    '- seed 004 (LightOn, French CCNet, 32 G tokens): L(C) exponent −0.041; Henighan et al. 2020: −0.048.',
    '',
    '## Each run against the baseline fits',
    '',
    'Relative loss difference to the baseline prediction (positive = worse than a baseline).',
    '',
    '| run | family | vs L(N) at trainable N | vs L(N) at all/emulated N | vs L(C) frozen 2/3 | vs L(C) frozen free |',
    '|---|---|---:|---:|---:|---:|',
  ]
  pct = lambda v: '' if v is None else f'{100 * v:+.1f}%'
  for d in analysis['deviations']:
    lines.append(
      f'| {d["name"]} | {d["family"]} | {pct(d.get("vs_L(N)_trainable"))} | {pct(d.get("vs_L(N)_all"))} '
      f'| {pct(d.get("vs_L(C)_compute"))} | {pct(d.get("vs_L(C)_frozen_free"))} |'
    )
  lines += _markdown_seeds(analysis)
  lines += [''] + [f'![{os.path.basename(p)}]({os.path.basename(p)})' for p in plots] + ['']
  return '\n'.join(lines)


def _mean_2se(values) -> str:
  m, h = report.paired(values)
  return f'{100 * m:+.2f}%' if h is None else f'{100 * m:+.2f}% ± {100 * h:.2f}%'


def _markdown_seeds(analysis: dict) -> list[str]:
  """Per-seed numbers (each seed's runs against its own baselines) and their mean ± 2 SE over seeds."""
  seeds = analysis.get('per_seed') or {}
  if not seeds:
    return []
  names = list(seeds)
  lines = [
    '',
    '## Seed by seed',
    '',
    "Each seed's runs against the fits of that seed's baselines, averaged over each kind's sizes; the doped runs "
    'against the baseline with the same trainable blocks. Mean ± 2 standard errors over the seeds.',
    '',
    f'| kind | measure | {" | ".join("seed " + n for n in names)} | mean ± 2 SE |',
    '|---|---|' + '---:|' * (len(names) + 1),
  ]
  kinds = sorted({k for v in seeds.values() for k in v['kinds']})
  for fam in kinds:
    for key in DEVIATIONS:
      vals = [seeds[n]['kinds'].get(fam, {}).get(key) for n in names]
      if None not in vals:
        lines.append(f'| {fam} | {key} | ' + ' | '.join(f'{100 * v:+.2f}%' for v in vals) + f' | {_mean_2se(vals)} |')
  for size in sorted(
    {k for v in seeds.values() for k in v['doped_vs_same_blocks']}, key=lambda k: int(k.split('x')[1])
  ):
    vals = [seeds[n]['doped_vs_same_blocks'].get(size) for n in names]
    if None not in vals:
      lines.append(
        f'| doped-{size} | vs baseline-{size} | '
        + ' | '.join(f'{100 * v:+.2f}%' for v in vals)
        + f' | {_mean_2se(vals)} |'
      )
  for key in ('L(N)', 'L(C) compute'):
    vals = [seeds[n]['exponents'][key] for n in names]
    if None not in vals:
      m, h = report.paired(vals)
      lines.append(
        f'| baseline | {key} exponent | '
        + ' | '.join(f'{x:.4f}' for x in vals)
        + f' | {m:.4f} ± {float("nan") if h is None else h:.4f} |'
      )
  return lines


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--sweep', default='cpu', help='cpu | quick')
  p.add_argument('--root', default='experiments/runs', help='where run workdirs live (git-ignored)')
  p.add_argument('--steps', type=int, default=None, help="override every run's steps")
  p.add_argument('--corpus', default=None, help='override data.corpus (tests)')
  p.add_argument('--out', default=None, help='output prefix (default experiments/results/scaling_<sweep>)')
  p.add_argument('--only', default='', help='comma-separated run names (default: all)')
  p.add_argument('--analyse_only', action='store_true', help='no training: fit and plot the finished runs')
  p.add_argument('--shard', default='', help='i/n: train only part i of n (parallel processes), no analysis')
  args = p.parse_args(argv)
  runs = sweep_runs(args.sweep, args.steps)
  if args.only:
    runs = [r for r in runs if r.name in args.only.split(',')]
  if args.shard:
    results, complete = run_sweep(shard(runs, args.sweep, args.shard), os.path.join(args.root, args.sweep), args.sweep)
    print(f'shard {args.shard}: {len(results)} runs finished' + ('' if complete else '; rerun to resume'), flush=True)
    return {'results': results, 'complete': complete}
  root = os.path.join(args.root, args.sweep)
  t0, load0 = time.time(), os.getloadavg()[0]
  if args.analyse_only:
    results = [r for r in (read_result(os.path.join(root, run.name)) for run in runs) if r]
    complete = len(results) == len(runs)
  else:
    results, complete = run_sweep(runs, root, args.sweep, args.corpus)
  if not complete and not args.analyse_only:
    print(f'{len(results)}/{len(runs)} runs finished; rerun to resume', flush=True)
    return {'results': results, 'complete': False}
  seeds = {run.name: run.seed for run in runs}
  for r in results:  # result.json files written before runs recorded their seed
    r.setdefault('seed', seeds[r['name']])
  prefix = args.out or os.path.join(RESULTS, f'scaling_{args.sweep}')
  os.makedirs(os.path.dirname(prefix), exist_ok=True)
  analysis = analyse(results, warmup_steps=run_config(runs[0], args.sweep).train.warmup_steps)
  plots = plot(results, analysis, prefix)
  meta = dict(
    sweep=args.sweep,
    runs=len(results),
    wall_s=time.time() - t0,
    note=f'{len(results)} runs; base recipe: rotary GPT, BPE {base_config(args.sweep).data.bpe_vocab_size} '
    f'on the embedded corpus, ctx {base_config(args.sweep).data.seq_len}, batch '
    f'{base_config(args.sweep).train.batch_size}, AdamW lr {base_config(args.sweep).train.lr} '
    f'cosine, no weight decay. Shared 2-core CPU (load average {load0:.1f} at start).',
  )
  md = markdown(results, analysis, args.sweep, plots, meta)
  with open(prefix + '.md', 'w', encoding='utf-8') as f:
    f.write(md)
  with open(prefix + '.json', 'w', encoding='utf-8') as f:
    json.dump(
      dict(meta=meta, results=results, **analysis),
      f,
      indent=1,
      default=float,
    )
  print(md)
  return {'results': results, 'complete': True, 'analysis': analysis}


if __name__ == '__main__':
  main()
