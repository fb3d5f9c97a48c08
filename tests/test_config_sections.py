"""Per-family config sections (`model.pgpt.*`, ..., the dense kinds' `model.dense.*`) and the run directories
and exports of the older flat layout.

A run written by an effjax whose `model` namespace was flat (`model.num_branches`) keeps working: its
config.json and its checkpoints' recorded architecture are migrated on read (checkpoint.migrate_model /
migrate_architecture), so sample, eval, export and resume run on it unchanged.
"""

from __future__ import annotations

import glob
import json
import os

import pytest

import effjax
from effjax import checkpoint, train
from effjax.configs import base, blockdiag, ccgpt, gpt, lowrank, pgpt
from effjax.errors import EffjaxError
from tests.helpers import run_cli, train_losses, variant_config


def old_layout(model: dict) -> dict:
  """A model config as effjax wrote it before the sections: every moved key flat again."""
  flat = {
    old: model[new.split('.')[0]][new.split('.')[1]]
    for old, new in base.MOVED_MODEL_KEYS.items()
    if new.split('.')[1] in (model.get(new.split('.')[0]) or {})
  }
  out = {k: v for k, v in model.items() if k not in {new.split('.')[0] for new in base.MOVED_MODEL_KEYS.values()}}
  return {**out, **flat}


def old_architecture(arch: dict) -> dict:
  renamed = {new: old for old, new in base.MOVED_MODEL_KEYS.items()}
  return {renamed.get(k, k): v for k, v in arch.items()}


def to_old_layout(run_dir: str) -> None:
  """Rewrites a run directory (config.json and every checkpoint's meta) as the flat-key effjax wrote it."""
  path = os.path.join(run_dir, 'config.json')
  config = json.load(open(path, encoding='utf-8'))
  config['model'] = old_layout(config['model'])
  json.dump(config, open(path, 'w', encoding='utf-8'))
  metas = glob.glob(os.path.join(run_dir, 'checkpoints', '*', 'meta', 'metadata'))
  assert metas
  for meta_path in metas:
    meta = json.load(open(meta_path, encoding='utf-8'))
    meta['architecture'] = old_architecture(meta['architecture'])
    json.dump(meta, open(meta_path, 'w', encoding='utf-8'))


def test_family_keys_live_in_their_sections_and_take_overrides():
  m = pgpt.get_config('paper').model
  assert (m.pgpt.num_branches, m.pgpt.branch_input, m.pgpt.branch_impl) == (2, 'split', 'vmap')
  assert 'num_branches' not in m and 'pgpt.num_branches' in checkpoint.architecture(m)
  m = ccgpt.get_config('k3').model
  assert (m.compress.compress_every, m.compress.compress_factor, m.compress.conv_kernel) == (2, 2, 3)
  assert {'compress.compress_every', 'compress.conv_kernel'} <= set(checkpoint.architecture(m))
  m = blockdiag.get_config('figure5').model
  assert (m.dense.num_blocks, m.dense.blockdiag_mix) == (4, 'expanding') and 'num_blocks' not in m
  assert {'dense.num_blocks', 'dense.blockdiag_mix'} <= set(checkpoint.architecture(m))
  m = lowrank.get_config('tiny').model  # a kind's own key: only its config file adds it to the dense section
  assert m.dense.lowrank_rank == 8 and checkpoint.architecture(m)['dense.lowrank_rank'] == 8
  assert 'lowrank_rank' not in gpt.get_config('').model.dense
  assert 'dense.num_blocks' not in checkpoint.architecture(gpt.get_config('').model)  # plain dense layers
  result = run_cli(
    '--config=pgpt:tiny', '--mode=config', '--config.model.pgpt.num_branches=1', '--config.model.num_layers=4'
  )
  assert result.returncode == 2 and 'model.pgpt.num_branches=1 is invalid' in result.stderr
  result = run_cli(
    '--config=pgpt:tiny', '--mode=config', '--config.model.pgpt.num_branches=4', '--config.model.num_layers=4'
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert any(line.split()[:3] == ['model.pgpt.num_branches', '4', 'override'] for line in result.stdout.splitlines())


def test_flat_model_keys_are_migrated_into_sections():
  saved = {'family': 'pgpt', 'num_layers': 2, 'num_branches': 3, 'branch_input': 'split', 'active_branches': [1]}
  model = checkpoint.migrate_model(saved)
  assert model['pgpt'] == {'num_branches': 3, 'branch_input': 'split', 'active_branches': [1]}
  assert 'num_branches' not in model and model['num_layers'] == 2
  model = checkpoint.migrate_model({'family': 'ccgpt', 'compress_every': 3, 'compress_factor': 4, 'conv_kernel': 5})
  assert model == {'family': 'ccgpt', 'compress': {'compress_every': 3, 'compress_factor': 4, 'conv_kernel': 5}}
  # the flat string model.doping becomes the section's pattern
  model = checkpoint.migrate_model({'family': 'gpt', 'doping': 'TFTFT', 'frozen_mlp_ratio': 4, 'num_layers': 3})
  assert model == {'family': 'gpt', 'num_layers': 3, 'doping': {'pattern': 'TFTFT', 'frozen_mlp_ratio': 4}}
  assert checkpoint.migrate_model({'doping': {'pattern': 'TFT'}}) == {'doping': {'pattern': 'TFT'}}
  model = checkpoint.migrate_model(
    {'mlp_kind': 'blockdiag', 'num_blocks': 8, 'blockdiag_mix': 'expanding', 'lowrank_rank': 16}
  )
  assert model == {
    'mlp_kind': 'blockdiag',
    'dense': {'num_blocks': 8, 'blockdiag_mix': 'expanding', 'lowrank_rank': 16},
  }
  # a key already in its section wins over a stray flat one
  assert checkpoint.migrate_model({'num_branches': 3, 'pgpt': {'num_branches': 4}})['pgpt'] == {'num_branches': 4}
  with pytest.raises(EffjaxError, match='both model.num_branches and a model.pgpt value that is no section'):
    checkpoint.migrate_model({'num_branches': 3, 'pgpt': 7})
  assert checkpoint.migrate_architecture({'num_branches': 2, 'd_model': 64}) == {'pgpt.num_branches': 2, 'd_model': 64}
  assert checkpoint.migrate_architecture({'num_blocks': 4, 'lowrank_rank': 8}) == {
    'dense.num_blocks': 4,
    'dense.lowrank_rank': 8,
  }


def test_flat_checkpoint_architecture_is_still_checked():
  config = pgpt.get_config('tiny')
  config.model.vocab_size = 50
  meta = {'architecture': {**old_architecture(checkpoint.architecture(config.model)), 'num_branches': 4}}
  with pytest.raises(EffjaxError, match=r'pgpt.num_branches: checkpoint 4 vs config 2'):
    checkpoint.check_compatible(meta, config.model, 'old/checkpoints')
  meta['architecture']['num_branches'] = 2
  checkpoint.check_compatible(meta, config.model, 'old/checkpoints')


@pytest.mark.slow
def test_flat_key_run_dir_samples_evaluates_exports_and_resumes(tmp_path, corpus_dir):
  run = str(tmp_path / 'run')
  overrides = {
    'train.steps': 4,
    'train.log_every': 1,
    'checkpoint.every': 2,
    'train.eval_every': 100,
    'model.mlp_kind': 'blockdiag',
  }  # so the architecture records dense.num_blocks too
  train.train_and_evaluate(variant_config(pgpt, corpus_dir, **overrides, **{'train.stop_at': 2}), run)
  to_old_layout(run)
  saved = json.load(open(os.path.join(run, 'config.json'), encoding='utf-8'))['model']
  assert saved['num_branches'] == 2 and saved['num_blocks'] == 4 and 'pgpt' not in saved and 'dense' not in saved

  result = run_cli(f'--workdir={run}', '--mode=sample', '--prompt=def ', '--max_new_tokens=8', '--temperature=0')
  assert result.returncode == 0 and result.stdout.startswith('def '), result.stderr[-2000:]
  result = run_cli(f'--workdir={run}', '--mode=eval', '--config.train.eval_batches=1')
  assert result.returncode == 0, result.stderr[-2000:]
  assert json.load(open(os.path.join(run, 'eval.json'), encoding='utf-8'))['loss'] > 0
  result = run_cli(f'--workdir={run}', '--mode=sample', '--config.model.pgpt.branch_input=project')
  assert result.returncode == 2, result.stderr[-2000:]
  assert "model.pgpt.branch_input='project' (the run has 'split') conflicts with the architecture" in result.stderr

  export = str(tmp_path / 'export')
  result = run_cli(f'--workdir={run}', '--mode=export', f'--export_dir={export}')
  assert result.returncode == 0, result.stderr[-2000:]
  path = os.path.join(export, 'config.json')  # an export written by the flat-key effjax loads too
  config = json.load(open(path, encoding='utf-8'))
  json.dump({**config, 'model': old_layout(config['model'])}, open(path, 'w', encoding='utf-8'))
  _, _, loaded = effjax.load_export(export)
  assert loaded.model.pgpt.num_branches == 2 and loaded.model.pgpt.branch_input == 'split'

  train.train_and_evaluate(variant_config(pgpt, corpus_dir, **overrides), run)  # resumes from step 2
  assert sorted(train_losses(run)) == [1, 2, 3, 4]


def test_variant_files_import_only_base_and_presets():
  """No variant builds on another: each effjax/configs variant imports effjax.configs.base / presets alone, so a
  new variant touches only its own file (the shared recipes are effjax/configs/presets.py)."""
  import ast  # pylint: disable=import-outside-toplevel
  from effjax import config_lookup  # pylint: disable=import-outside-toplevel

  for name in config_lookup.variants():
    path = os.path.join(config_lookup.builtin_dir(), f'{name}.py')
    tree = ast.parse(open(path, encoding='utf-8').read())
    imported = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module == 'effjax.configs':
        imported |= {alias.name for alias in node.names}
      elif isinstance(node, ast.ImportFrom) and (node.module or '').startswith('effjax.configs.'):
        imported.add(node.module.rsplit('.', 1)[1])
      elif isinstance(node, ast.Import):
        imported |= {a.name for a in node.names if a.name.startswith('effjax.configs')}
    assert imported <= {'base', 'presets'}, (name, imported)


def test_tiny_presets_share_one_recipe():
  """Every variant's tiny is presets.tiny plus its own changes: 64 wide, ctx 32, 40 steps, checkpoint every 20."""
  from effjax import config_lookup  # pylint: disable=import-outside-toplevel

  for name in config_lookup.variants():
    c = config_lookup._builtin_module(name).get_config('tiny')  # pylint: disable=protected-access
    assert (c.model.d_model, c.model.max_len, c.data.seq_len, c.train.steps, c.checkpoint.every) == (
      64,
      32,
      32,
      40,
      20,
    ), name


def test_model_config_is_checked_once_per_start(monkeypatch):
  """models.resolve checks the model config once (vocab_size 0 passes: the tokenizer gives it later); models built
  from it afterwards, with the vocabulary filled in, are not checked again. A config it has not seen is."""
  from effjax import models  # pylint: disable=import-outside-toplevel
  from effjax.models import validate  # pylint: disable=import-outside-toplevel

  calls = []
  check = validate.check_model_config
  monkeypatch.setattr(validate, 'check_model_config', lambda *a, **k: calls.append(1) or check(*a, **k))
  config = gpt.get_config('tiny')
  config.model.update(num_layers=3, rope_base=1234.5)  # a config no other test checks in this process
  models.resolve(config)
  config.model.vocab_size = 50
  for _ in range(3):
    models.build_model(config.model)
  assert len(calls) == 1
  config.model.num_layers = 5
  models.build_model(config.model)
  assert len(calls) == 2
  config.model.vocab_size = 0  # known vocabulary from here on: building needs one
  with pytest.raises(EffjaxError, match=r'^model\.vocab_size=0 is invalid; it must be a positive integer$'):
    models.build_model(config.model)


def test_flat_keys_a_config_file_still_sets_are_read_from_their_sections(tmp_path):
  """A config file written for the flat layout (model.num_blocks) runs: resolve moves the key into its section with
  a warning. A library caller building such a config directly gets one line naming where the key lives now."""
  from effjax.models import build_model  # pylint: disable=import-outside-toplevel

  own = tmp_path / 'flat.py'
  own.write_text(
    'from effjax.configs import blockdiag\n\n\ndef get_config(preset=""):\n'
    '  c = blockdiag.get_config("tiny")\n  c.model.num_blocks = 8\n  return c\n'
  )
  result = run_cli(f'--config={own}', '--mode=config')
  assert result.returncode == 0, result.stderr[-2000:]
  assert any(line.split()[:2] == ['model.dense.num_blocks', '8'] for line in result.stdout.splitlines())
  assert not any(line.startswith('model.num_blocks ') for line in result.stdout.splitlines())
  assert 'model.num_blocks has moved to model.dense.num_blocks' in result.stderr
  m = blockdiag.get_config('tiny').model
  m.update(vocab_size=11, num_blocks=8)
  with pytest.raises(
    EffjaxError,
    match=r'^model\.num_blocks has moved to model\.dense\.num_blocks; set '
    r'model\.dense\.num_blocks instead$',
  ):
    build_model(m)
