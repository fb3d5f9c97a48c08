"""experiments/REPORT.md against experiments/results/: every table number is in a results file, the tables are what
`python -m experiments.report` regenerates from those files, and the verdict rule does what the report says.
No training: reads JSON and markdown only."""

import json
import math
import os
import re

import numpy as np
import pytest

from experiments import report

NUMBER = re.compile(r'(?<![\w.])[-+−]?\d[\d,]*(?:\.\d+)?')


def _numbers(text: str) -> list[str]:
  return [m.group(0).replace('−', '-').lstrip('+') for m in NUMBER.finditer(text)]


def _table_lines(text: str) -> list[str]:
  return [line for line in text.splitlines() if line.startswith('|') and not re.fullmatch(r'\|[-:| ]+\|', line)]


@pytest.fixture(scope='module')
def known():
  """The value of every number written in a results file (markdown, JSON values and strings): a table number must
  equal one of them exactly as written (0.20 = 0.2), not merely round to one."""
  tokens = set()
  for name in os.listdir(report.RESULTS):
    if not name.endswith(('.json', '.md')):
      continue
    with open(os.path.join(report.RESULTS, name), encoding='utf-8') as f:
      text = f.read()
    tokens.update(float(t.replace(',', '')) for t in _numbers(text))
  return tokens


def _found(token: str, known) -> bool:
  v = float(token.replace(',', ''))
  return v in known or -v in known


def test_every_table_number_is_in_a_results_file(known):
  with open(report.REPORT, encoding='utf-8') as f:
    lines = _table_lines(f.read())
  assert len(lines) > 50
  missing = [(t, line[:80]) for line in lines for t in _numbers(line) if not _found(t, known)]
  assert not missing, f'{len(missing)} table numbers are in no results file, e.g. {missing[:8]}'


def test_report_tables_are_regenerated_from_the_results():
  assert report.main(['--check', '--no_figures']) == 0


def test_every_block_in_the_report_is_generated():
  with open(report.REPORT, encoding='utf-8') as f:
    names = [m.group(2) for m in report.BLOCK.finditer(f.read())]
  assert set(names) == set(report.BLOCKS), set(names) ^ set(report.BLOCKS)


@pytest.mark.parametrize(
  'delta, half, seeds, expected',
  [
    (0.003, 0.004, 3, report.CONSISTENT),  # [-0.1 %, 0.7 %] inside (-inf, 1 %]
    (0.030, 0.010, 3, report.CONTRADICTED),  # [2 %, 4 %] above the band
    (0.008, 0.004, 3, report.NOT_RESOLVED),  # [0.4 %, 1.2 %] straddles the edge
    (0.003, 0.001, 2, report.NOT_RESOLVED),  # too few seeds, however tight
    (0.003, None, 5, report.NOT_RESOLVED),  # no interval
  ],
)
def test_verdict_rule(delta, half, seeds, expected):
  assert report.verdict(delta, half, (-math.inf, 0.01), seeds) == expected


def test_paired_interval_is_two_standard_errors():
  mean, half = report.paired([0.01, 0.02, 0.03])
  assert mean == pytest.approx(0.02)
  assert half == pytest.approx(2 * 0.01 / math.sqrt(3))
  assert report.paired([0.5]) == (0.5, None)


def test_prune_control_summary_is_mean_and_std_over_seeds():
  from experiments import prune_control  # pylint: disable=import-outside-toplevel

  seeds = [
    dict(
      seed=s,
      num_layers=8,
      train_steps=600,
      budget_steps=750,
      rows=[dict(k=0, loss_before=4.5, loss_after=4.40), dict(k=2, loss_before=4.7, loss_after=a, shallow_loss=b)],
    )
    for s, a, b in ((0, 4.444, 4.48844), (1, 4.422, 4.46622), (2, 4.4308, 4.4308))
  ]
  (row,) = prune_control.summarize(seeds)
  assert row['k'] == 2 and row['layers_kept'] == 6
  assert row['pruned_vs_unpruned']['values'] == pytest.approx([0.01, 0.005, 0.007])
  assert row['pruned_vs_unpruned']['std'] == pytest.approx(0.0025166, rel=1e-4)
  assert row['shallow_vs_pruned']['mean'] == pytest.approx(0.02 / 3)
  md = prune_control.markdown(dict(seeds=seeds, summary=[row], finetune_steps=150, finetune_lr=5e-4, meta=''))
  assert '| 2 | 6 | +0.73% ± 0.25% |' in md


def test_prune_control_combines_per_seed_runs(tmp_path):
  from experiments import prune_control  # pylint: disable=import-outside-toplevel

  paths = []
  for seed, after in ((1, 4.422), (0, 4.444)):
    s = dict(
      seed=seed,
      num_layers=8,
      train_steps=600,
      budget_steps=750,
      rows=[dict(k=0, loss_before=4.5, loss_after=4.4), dict(k=2, loss_before=4.7, loss_after=after, shallow_loss=4.5)],
    )
    part = dict(
      seeds=[s],
      finetune_steps=150,
      finetune_lr=5e-4,
      summary=prune_control.summarize([s]),
      command=f'python -m experiments.prune_control --seeds {seed}',
      meta=f'seed {seed}.',
    )
    paths.append(str(tmp_path / f'part{seed}.json'))
    with open(paths[-1], 'w', encoding='utf-8') as f:
      json.dump(part, f)
  res = prune_control.main(['--combine', ','.join(paths), '--out', str(tmp_path / 'all')])
  assert [s['seed'] for s in res['seeds']] == [0, 1]
  (row,) = res['summary']
  assert row['pruned_vs_unpruned']['values'] == pytest.approx([0.01, 0.005])
  assert (tmp_path / 'all.md').exists() and json.loads((tmp_path / 'all.json').read_text())['summary'] == [row]


def test_pgpt_arms_pair_seeds_and_split_the_one_branch_rules():
  """Per-seed rows of results/pgpt_table.json: paired differences to gpt over shared seeds, one-branch arms (the
  published architecture's authors' rule and its weight-1 twin), seed-mean gaps; a row without 'seed' is seed 0."""
  curve = lambda loss: [[100, loss + 0.5], [200, loss]]
  rows = []
  for seed, g, p, pub in ((0, 2.0, 2.02, 2.04), (1, 2.1, 2.121, 2.142), (2, 1.9, 1.9095, 1.9285)):
    rows.append(dict(label='gpt', seed=seed, final_val_loss=g, val_curve=curve(g)))
    rows.append(
      dict(
        label='p-gpt',
        seed=seed,
        final_val_loss=p,
        val_curve=curve(p),
        val_loss_p_gpt_1=p + 0.1,
        branch_mix='softmax',
        branch_weights=[0.49, 0.51],
      )
    )
    rows.append(
      dict(
        label='p-gpt (published)',
        seed=seed,
        final_val_loss=pub,
        val_curve=curve(pub),
        val_loss_p_gpt_1=pub + 0.3,
        val_loss_p_gpt_1_unscaled=pub + 0.1,
        branch_mix='scalar',
        branch_weights=[0.52, 0.48],
      )
    )
  d = report.derive_pgpt(dict(rows=rows))
  assert d['pgpt_seeds'] == [0, 1, 2]
  assert d['pgpt_vs_gpt_pct']['p-gpt']['values'] == [1.0, 1.0, 0.5]
  assert d['pgpt_vs_gpt_pct']['p-gpt']['n'] == 3
  assert set(d['pgpt_loss']) == {
    'gpt',
    'p-gpt',
    'p-gpt-1',
    'p-gpt (published)',
    'p-gpt-1 (published, × its weight)',
    'p-gpt-1 (published, weight 1)',
  }
  assert d['pgpt_loss']['p-gpt-1 (published, weight 1)']['values'] == [2.14, 2.242, 2.0285]
  assert d['pgpt_val_gap']['p-gpt'] == {'100': round((0.02 + 0.021 + 0.0095) / 3, 3), '200': 0.017}
  assert len(d['pgpt_variants_pct']) == 4
  assert d['pgpt_branch_weights']['p-gpt (published)']['2'] == [0.52, 0.48]
  old = report.derive_pgpt(dict(rows=[{k: v for k, v in r.items() if k != 'seed'} for r in rows[:2]]))
  assert old['pgpt_seeds'] == [0] and old['pgpt_vs_gpt_pct']['p-gpt']['two_se'] is None


def test_efficio_grid_pairs_seeds_at_each_variants_best_lr():
  """Best lr per variant from its seed-0 runs; per-seed differences to the baseline at the baseline's own best lr;
  the interaction (L_sf − L_f) − (L_s − L_0) per lr and per seed."""
  base = {0.001: 5.0, 0.002: 4.9, 0.004: 5.1}
  loss = {  # variant: (seed-0 sweep, offsets of seeds 1 and 2 at the best lr)
    report.EFF_BASE: (base, (0.1, -0.1)),
    report.EFF_SF: ({0.001: 5.2, 0.002: 5.3, 0.004: 5.6}, (0.1, -0.05)),
    report.EFF_S: ({0.001: 5.05, 0.002: 5.0, 0.004: 5.2}, (0.1, -0.1)),
    report.EFF_F: ({0.001: 5.0, 0.002: 4.95, 0.004: 5.3}, (0.1, -0.1)),
  }
  rows = []
  for label, (sweep, offsets) in loss.items():
    curves = lambda v: dict(
      final_val_loss=v, train_curve=[(25, 7.0), (50, v + 0.5)], val_curve=[(100, v + 1), (300, v)]
    )
    rows += [dict(label=label, lr=lr, seed=0, **curves(v)) for lr, v in sweep.items()]
    best = min(sweep, key=sweep.get)
    rows += [dict(label=label, lr=best, seed=s, **curves(sweep[best] + o)) for s, o in zip((1, 2), offsets)]
  rows.append(
    dict(label=report.EFF_SF, lr=0.002, seed=1, final_val_loss=5.2, train_curve=[], val_curve=[(100, 6.2), (300, 5.2)])
  )
  g = report.derive_efficio_grid(dict(rows=rows))
  extra = g['vs_baseline_pct'][f'{report.EFF_SF} at lr 2e-3']  # a non-best lr run with several seeds
  assert extra['seeds'] == [0, 1] and extra['values'] == [
    round(100 * (5.3 / 4.9 - 1), 2),
    round(100 * (5.2 / 5.0 - 1), 2),
  ]
  assert g['best_lr'] == {
    report.EFF_BASE: '0.002',
    report.EFF_SF: '0.001',
    report.EFF_S: '0.002',
    report.EFF_F: '0.002',
  }
  x = g['vs_baseline_pct'][report.EFF_SF]
  want = [5.2 / 4.9 - 1, 5.3 / 5.0 - 1, 5.15 / 4.8 - 1]
  assert x['seeds'] == [0, 1, 2] and x['values'] == [round(100 * v, 2) for v in want]
  assert x['mean_frac'] == pytest.approx(np.mean(want))
  assert x['two_se_frac'] == pytest.approx(2 * np.std(want, ddof=1) / math.sqrt(3))
  assert g['interaction']['by_lr_seed0']['0.004']['interaction'] == pytest.approx((5.6 - 5.3) - (5.2 - 5.1))
  assert g['interaction']['best_lr']['interaction']['values'] == pytest.approx([0.15, 0.15, 0.2])
  assert g['seeds'][report.EFF_BASE]['val_curve_mean'] == {'100': 5.9, '300': 4.9}
  assert g['seeds'][report.EFF_BASE]['plateau_exit_step'] == [50, 50, 50]
  assert g['plateau_exit_step_seed0'][report.EFF_SF] == {'0.001': 50, '0.002': 50, '0.004': None}
