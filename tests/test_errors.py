"""Foundation user mistakes: each is one clear line naming the value, and nothing already written changes."""

import hashlib
import os

import pytest

from effjax import train
from effjax.errors import EffjaxError
from tests.helpers import run_cli, tiny_config


def snapshot(directory):
  """Content hashes of every file under a directory (to prove a failed run touched nothing)."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      if name == '.lock':
        continue
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
  return out


@pytest.fixture(scope='module')
def trained(tmp_path_factory, corpus_dir):
  workdir = str(tmp_path_factory.mktemp('trained'))
  train.train_and_evaluate(tiny_config(corpus_dir, **{'train.steps': 4, 'checkpoint.every': 2}), workdir)
  return workdir


@pytest.mark.slow
@pytest.mark.parametrize(
  'overrides,pattern',
  [
    ({'model.num_heads': 3}, r'num_heads=3 does not divide model.d_model=64'),
    ({'data.seq_len': 64}, r'data.seq_len=64 is invalid; it must be in 1..model.max_len=32'),
    ({'model.vocab_size': 500}, r'vocab_size: checkpoint \d+ vs config 500'),
    ({'model.d_model': 128}, r'd_model: checkpoint 64 vs config 128'),
    ({'data.tokenizer': 'byte'}, r'tokenizer'),
    ({'train.grad_accum': 3}, r'grad_accum=3 does not divide train.batch_size=8'),
  ],
)
def test_bad_config_against_existing_run_changes_nothing(trained, corpus_dir, overrides, pattern):
  before = snapshot(trained)
  with pytest.raises(EffjaxError, match=pattern) as info:
    train.train_and_evaluate(tiny_config(corpus_dir, **overrides), trained)
  assert '\n' not in str(info.value)
  assert snapshot(trained) == before


def test_missing_corpus(tmp_path):
  with pytest.raises(EffjaxError, match='does-not-exist'):
    train.train_and_evaluate(tiny_config(str(tmp_path / 'does-not-exist')), str(tmp_path / 'run'))


def test_empty_corpus(tmp_path):
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'empty' / 'a.txt').write_text('')
  with pytest.raises(EffjaxError, match='empty'):
    train.train_and_evaluate(tiny_config(str(tmp_path / 'empty')), str(tmp_path / 'run'))


def test_corpus_shorter_than_context(tmp_path):
  (tmp_path / 'short').mkdir()
  (tmp_path / 'short' / 'a.txt').write_text('x = 1\n')
  with pytest.raises(EffjaxError, match='seq_len'):
    train.train_and_evaluate(tiny_config(str(tmp_path / 'short')), str(tmp_path / 'run'))


def test_unwritable_workdir(tmp_path, corpus_dir):
  blocker = tmp_path / 'file'
  blocker.write_text('not a directory')
  with pytest.raises(EffjaxError, match='not writable'):
    train.train_and_evaluate(tiny_config(corpus_dir), str(blocker / 'run'))


def test_cli_unknown_key_and_bad_heads_are_one_line(tmp_path):
  result = run_cli('--config=configs/gpt.py:tiny', f'--workdir={tmp_path}/run', '--config.model.no_such_key=1')
  assert result.returncode != 0
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and 'no_such_key' in lines[0], result.stderr
  result = run_cli(
    '--config=configs/gpt.py:tiny',
    f'--workdir={tmp_path}/run',
    '--mode=summary',
    '--config.model.num_heads=3',
    '--config.model.vocab_size=50',
  )
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
    'effjax: error: model.num_heads=3 does not divide model.d_model=64; choose heads that divide the width'
  ]
  assert not os.path.exists(tmp_path / 'run' / 'summary.json')


def test_default_workdir_is_named_after_the_config():
  from effjax import main

  assert main.default_workdir('configs/pgpt.py') == 'runs/pgpt'
  assert main.default_workdir('configs/gpt.py:tiny') == 'runs/gpt_tiny'
