"""The command line as a new user meets it: configs by name from any directory, --list, --help, --mode=config,
and a run directory that describes itself (sample/eval/export/summary with --workdir alone)."""

import json
import os
import re
import types

import pytest

from effjax import config_lookup, modes, train
from effjax.errors import EffjaxError
from tests.helpers import ROOT, one_device, run_cli, tiny_config


def test_every_documented_preset_is_the_set_get_config_accepts():
  """--list reads the presets from each variant's docstring: it must name exactly what get_config accepts."""
  assert {'blockdiag', 'ccgpt', 'doped', 'efficio', 'fastfood', 'gpt', 'lcgpt', 'pgpt'} <= set(config_lookup.variants())
  for name in config_lookup.variants():
    module = config_lookup._builtin_module(name)  # pylint: disable=protected-access
    documented = config_lookup.presets(module.__doc__)
    with pytest.raises(EffjaxError) as info:
      module.get_config('no_such_preset')
    accepted = set(re.findall(r"'(\w*)'", str(info.value).split('valid presets:')[1]))
    assert set(documented) == accepted, name
    assert all(documented.values()), name
    for preset in documented:
      assert module.get_config(preset).model.num_layers > 0


def test_list_help_and_config_by_name_from_another_directory(tmp_path):
  listing = run_cli('--list', cwd=tmp_path)
  assert listing.returncode == 0, listing.stderr
  assert '  --config=pgpt:tiny ' in listing.stdout and listing.stdout.startswith('blockdiag: ')
  usage = run_cli('--help', cwd=tmp_path)
  assert usage.returncode == 0 and 'Examples:' in usage.stdout and '--config.KEY=VALUE' in usage.stdout
  assert '--workdir' in usage.stdout.split('Flags:')[1]

  shown = run_cli('--config=pgpt:tiny', '--mode=config', '--config.train.steps=7', cwd=tmp_path)
  assert shown.returncode == 0, shown.stderr
  rows = {line.split()[0]: (line.split()[1], line.split()[-1]) for line in shown.stdout.splitlines()}
  assert rows['train.steps'] == ('7', 'override')
  assert rows['model.d_model'] == ('64', 'preset') and rows['model.family'] == ("'pgpt'", 'default')

  missing = run_cli('--config=configs/pgpt.py:tiny', '--mode=summary', cwd=tmp_path)
  assert missing.returncode == 2
  assert missing.stderr.strip().splitlines() == [
    f"effjax: error: --config=configs/pgpt.py:tiny: there is no file 'configs/pgpt.py' (from {tmp_path}); "
    'the built-in variant is --config=pgpt:tiny'
  ]

  own = tmp_path / 'elsewhere' / 'mine.py'
  own.parent.mkdir()
  own.write_text(
    'from effjax.configs import base\n\n\ndef get_config(preset=""):\n  c = base.get_base()\n'
    '  c.model.num_layers = 3\n  return c\n'
  )
  shown = run_cli(f'--config={own}', '--mode=config', cwd=tmp_path)
  assert shown.returncode == 0, shown.stderr
  assert re.search(r'^model\.num_layers\s+3\s+default$', shown.stdout, re.M)


def test_summary_vocabulary_without_a_run_for_every_preset():
  """summary needs a vocabulary: char presets take it from the corpus's training characters, the others from
  the tokenizer's known size. Each distinct data section is resolved once (the result depends on nothing else)."""
  vocab_of = {}
  for name in config_lookup.variants():
    module = config_lookup._builtin_module(name)  # pylint: disable=protected-access
    for preset in config_lookup.presets(module.__doc__):
      config = module.get_config(preset)
      if config.model.vocab_size:
        continue
      key = json.dumps(config.data.to_dict(), sort_keys=True)
      if key not in vocab_of:
        vocab_of[key] = modes._vocab_without_corpus(config, None)  # pylint: disable=protected-access
      expected = {'byte': 256, 'bpe': config.data.bpe_vocab_size}.get(config.data.tokenizer)
      assert vocab_of[key] == expected or (expected is None and 60 < vocab_of[key] < 1000), (name, preset)


def test_summary_of_a_char_preset_without_a_run(capsys):
  modes.run_summary(config_lookup._builtin_module('lcgpt').get_config(), types.SimpleNamespace(workdir=None))
  assert re.search(r'^total_params\s+[\d,]+$', capsys.readouterr().out, re.M)


@pytest.mark.slow
def test_run_directory_describes_itself(tmp_path, corpus_dir):
  """After training, a run's own config.json is its config (test_train.test_cli_modes_on_tiny runs eval, sample,
  export and summary that way); overrides apply on top, and one that changes the architecture is refused."""
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(
    tiny_config(corpus_dir, **{'train.steps': 4, 'checkpoint.every': 4}), workdir, devices=one_device(), progress=False
  )
  shown = run_cli(f'--workdir={workdir}', '--mode=config', '--config.train.eval_batches=1', cwd=tmp_path)
  assert re.search(r'^train\.eval_batches\s+1\s+override$', shown.stdout, re.M), shown.stderr
  assert re.search(r'^train\.steps\s+4\s+workdir$', shown.stdout, re.M)
  conflict = run_cli(f'--workdir={workdir}', '--mode=sample', '--config.model.d_model=32', cwd=tmp_path)
  assert conflict.returncode == 2
  assert conflict.stderr.strip().splitlines() == [
    f'effjax: error: model.d_model=32 (the run has 64) conflicts with the architecture of the run in {workdir}; '
    'its checkpoints have that shape (leave the override out, or train a new run)'
  ]
  nothing = run_cli(f'--workdir={tmp_path}/none', '--mode=eval', cwd=tmp_path)
  assert nothing.returncode == 2 and 'has no config.json' in nothing.stderr


def test_config_lookup_resolves_names_and_keeps_paths(tmp_path):
  path = config_lookup.resolve('pgpt:tiny')
  assert path.endswith(os.path.join('effjax', 'configs', 'pgpt.py') + ':tiny') and os.path.isfile(path[:-5])
  here = os.getcwd()
  try:
    os.chdir(ROOT)
    assert config_lookup.resolve('configs/pgpt.py:tiny') == 'configs/pgpt.py:tiny'
  finally:
    os.chdir(here)
