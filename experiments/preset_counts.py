"""Parameter counts of the paper presets, as `--mode=summary` computes them: `python -m experiments.preset_counts`.

No data and no training (abstract shapes only, a few seconds). Writes experiments/results/preset_counts.{json,md},
the source of the counts REPORT.md compares with the papers.
"""

from __future__ import annotations

import importlib
import json
import os

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')

# (config module, preset, what the row counts; active=True: the count of the running branches (p-gpt-1))
PRESETS = (
  ('gpt', 'paper_pgpt_baseline', "the p-gpt study's GPT", False),
  ('pgpt', 'paper', "p-gpt, both branches (today's variant: final norm after the mix, softmax mix)", False),
  ('pgpt', 'paper_1', 'p-gpt-1, one branch of the above (active_params)', True),
  ('pgpt', 'published', "p-gpt as the authors' code has it (no norm after the mix, one scalar weight)", False),
  ('pgpt', 'published_1', 'p-gpt-1 of the above (the kept branch scaled by its weight; active_params)', True),
  ('lcgpt', 'paper', 'lc-gpt', False),
  ('ccgpt', 'paper', 'cc-gpt', False),
  ('efficio', 'paper', 'GPT-Efficio (our reading of the ~950M model)', False),
)
KEYS = (
  'total_params',
  'param_mb',
  'trainable_params',
  'embedding_params',
  'flops_per_token',
  'active_params',
  'active_param_mb',
  'single_branch_params',
  'single_branch_param_mb',
  'params_per_block',
  'embed_table_params',
  'embed_projection_params',
  'unshared_equivalent_params',
)


def count(module: str, preset: str) -> dict:
  from effjax import accounting  # pylint: disable=import-outside-toplevel

  config = importlib.import_module(f'effjax.configs.{module}').get_config(preset)
  summary = accounting.summarize(config)
  return {k: summary[k] for k in KEYS if k in summary}


def main(argv=None) -> dict:
  del argv
  rows = []
  for module, preset, what, active in PRESETS:
    rows.append(dict(name=f'{module}:{preset}', what=what, active=active, **count(module, preset)))
  out = dict(command='python -m experiments.preset_counts', rows=rows)
  lines = ['| preset | what | total params | MB | active params | active MB |', '|---|---|---:|---:|---:|---:|']
  for r in rows:
    lines.append(
      f'| {r["name"]} | {r["what"]} | {r["total_params"]:,} | {r["param_mb"]:.2f} | '
      f'{r.get("active_params", "")} | {r.get("active_param_mb", "")} |'
    )
  os.makedirs(RESULTS, exist_ok=True)
  with open(os.path.join(RESULTS, 'preset_counts.json'), 'w', encoding='utf-8') as f:
    json.dump(out, f, indent=1)
  with open(os.path.join(RESULTS, 'preset_counts.md'), 'w', encoding='utf-8') as f:
    f.write('\n'.join(lines) + '\n\n`python -m experiments.preset_counts` (abstract shapes, no training).\n')
  print('\n'.join(lines))
  return out


if __name__ == '__main__':
  main()
