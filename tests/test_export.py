"""--mode=export and effjax.load_export: an inference-ready export that needs no training workdir."""

from __future__ import annotations

import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import effjax
from effjax import accounting, checkpoint, modes, state as state_lib, train
from effjax.data import tokenizers
from effjax.errors import EffjaxError
from effjax.models import build_model
from tests.helpers import tiny_config
from tests.test_bad_input import cli

FAMILY_PRESETS = ('gpt', 'pgpt', 'lcgpt', 'ccgpt', 'efficio')


def _restored(config, workdir):
  setup, state, config, tokenizer, meta = modes.restore_trained(config, workdir)
  return setup.model, state.variables(), tokenizer, meta


def _tokens(tokenizer, text='def function_1(x):\n    return x'):
  return jnp.asarray(np.asarray(tokenizer.encode(text), np.int32)[None, :32])


@pytest.fixture(scope='module')
def run(tmp_path_factory, corpus_dir):
  """A tiny GPT trained 4 steps, exported through the CLI, then moved away from its workdir."""
  root = tmp_path_factory.mktemp('export')
  workdir = str(root / 'run')
  config = tiny_config(corpus_dir, **{'train.steps': 4, 'checkpoint.every': 2})
  train.train_and_evaluate(config, workdir, progress=False)
  common = ['--config=configs/gpt.py:tiny', f'--workdir={workdir}', f'--config.data.corpus={corpus_dir}']
  for name, extra in (('f32', []), ('bf16', ['--export_dtype=bfloat16']), ('unscanned', ['--export_layout=unscanned'])):
    code, out, err = cli(*common, '--mode=export', f'--export_dir={root}/{name}', *extra)
    assert code == 0, err
    assert 'exported step 4' in out
  model, variables, tokenizer, meta = _restored(config, workdir)
  tokens = _tokens(tokenizer)
  expected = np.asarray(model.apply(variables, tokens))
  code, sampled_from_run, err = cli(*common, '--mode=sample', '--prompt=def ', '--max_new_tokens=12', '--temperature=0')
  assert code == 0, err
  task = root / 'cloze.jsonl'
  task.write_text('\n'.join(json.dumps({'text': f'def function_{i}(x): return x'}) for i in range(3)))
  tasks = [f'--tasks=cloze:{task},humaneval', '--max_examples=1', '--max_new_tokens=8', '--temperature=0']
  code, out, err = cli(*common, '--mode=eval', *tasks)
  assert code == 0, err
  evaluated = json.loads((root / 'run' / 'eval.json').read_text())
  assert json.loads(out.strip().splitlines()[-1]) == evaluated
  shutil.rmtree(workdir)  # the exports must not need the run
  return {
    'root': root,
    'tokens': tokens,
    'logits': expected,
    'meta': meta,
    'sample': sampled_from_run,
    'config': config,
    'eval': evaluated,
    'tasks': tasks,
  }


@pytest.mark.slow
def test_export_files_and_metadata(run):
  export = run['root'] / 'f32'
  assert sorted(os.listdir(export)) == ['config.json', 'metadata.json', 'tokenizer.json', 'variables']
  metadata = json.loads((export / 'metadata.json').read_text())
  counts = accounting.param_counts(train.resolve_vocab(run['config'], tokenizers.load_tokenizer(str(export))).model)
  assert metadata['family'] == 'gpt' and metadata['effjax_version'] == effjax.__version__
  assert metadata['step'] == 4 and metadata['tokens_seen'] == 4 * 8 * 32
  assert metadata['total_params'] == counts['total_params'] and metadata['trainable_params'] > 0
  assert metadata['scanned_layers'] is True and metadata['layout'] == 'scanned' and metadata['dtype'] == 'float32'
  config = json.loads((export / 'config.json').read_text())
  assert config['model']['vocab_size'] > 0 and config['model']['family'] == 'gpt'
  # params only: no optimizer state in the export
  assert not any('opt_state' in root or 'mu' in dirs for root, dirs, _ in os.walk(export))


@pytest.mark.slow
def test_load_export_gives_the_trained_logits_without_the_workdir(run):
  model, variables, config = effjax.load_export(str(run['root'] / 'f32'))
  assert set(variables) == {'params'}
  np.testing.assert_array_equal(np.asarray(model.apply(variables, run['tokens'])), run['logits'])
  assert config.model.max_len == 32


@pytest.mark.slow
def test_unscanned_layout_same_logits(run):
  model, variables, config = effjax.load_export(str(run['root'] / 'unscanned'))
  assert not config.model.scan_layers
  assert set(variables['params']['stack']) == {'layer_0', 'layer_1'}
  assert json.loads((run['root'] / 'unscanned' / 'metadata.json').read_text())['layout'] == 'unscanned'
  np.testing.assert_allclose(np.asarray(model.apply(variables, run['tokens'])), run['logits'], atol=1e-5)


@pytest.mark.slow
def test_bfloat16_export(run):
  model, variables, config = effjax.load_export(str(run['root'] / 'bf16'))
  assert config.model.param_dtype == 'bfloat16'
  assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype(jnp.bfloat16)}
  logits = np.asarray(model.apply(variables, run['tokens']))
  assert np.abs(logits - run['logits']).max() < 0.1 * np.abs(run['logits']).max()


def test_sample_from_export_matches_the_run(run):
  code, out, err = cli(
    f'--from_export={run["root"]}/f32', '--mode=sample', '--prompt=def ', '--max_new_tokens=12', '--temperature=0'
  )
  assert code == 0, err
  assert out == run['sample'] and out.startswith('def ')


@pytest.mark.slow
def test_eval_of_the_run_and_of_its_export_agree(run, tmp_path):
  """--mode=eval on the workdir (validation loss + tasks) and --from_export (tasks) give the same task scores."""
  from_run = run['eval']
  assert from_run['step'] == 4 and {'loss', 'ppl', 'bpb'} <= set(from_run)
  assert from_run['ppl'] == pytest.approx(np.exp(from_run['loss']))
  code, out, err = cli(
    f'--from_export={run["root"]}/f32', '--mode=eval', *run['tasks'], f'--workdir={tmp_path}/evaldir'
  )
  assert code == 0, err
  result = json.loads(out.strip().splitlines()[-1])
  assert result['step'] == 4
  assert json.loads((tmp_path / 'evaldir' / 'eval.json').read_text()) == result
  cloze = next(k for k in result['tasks'] if k.startswith('cloze:'))
  assert result['tasks'][cloze]['loss'] == pytest.approx(from_run['tasks'][cloze]['loss'], rel=1e-5)
  assert result['tasks'][cloze]['num_examples'] == 1
  assert result['tasks']['humaneval']['num_problems'] == 1 and result['tasks']['humaneval']['pass@1'] == 0.0


@pytest.mark.slow
def test_shared_model_export_keeps_sharing(tmp_path, corpus_dir):
  """GPT-Efficio (one block applied at every layer): the export stores the block once."""
  from effjax.configs import efficio  # pylint: disable=import-outside-toplevel

  config = efficio.get_config('tiny')
  config.data.corpus = corpus_dir
  config.train.update(steps=2, eval_every=2)
  config.checkpoint.every = 2
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir, progress=False)
  model, variables, tokenizer, _ = _restored(config, workdir)
  code, _, err = cli(
    '--config=configs/efficio.py:tiny',
    f'--workdir={workdir}',
    f'--config.data.corpus={corpus_dir}',
    '--mode=export',
    f'--export_dir={tmp_path}/export',
  )
  assert code == 0, err
  loaded, loaded_vars, loaded_config = effjax.load_export(str(tmp_path / 'export'))
  assert loaded_config.model.share_layers == 'all' and loaded_config.model.num_layers == 4
  assert set(loaded_vars['params']['stack']) == {'shared'}
  assert jax.tree.leaves(loaded_vars['params']['stack'])[0].ndim <= 2  # no leading layer axis
  metadata = json.loads((tmp_path / 'export' / 'metadata.json').read_text())
  assert metadata['share_layers'] == 'all'
  unshared = ml_collections.ConfigDict(loaded_config.model.to_dict())
  unshared.share_layers = 'none'
  assert metadata['total_params'] < accounting.param_counts(unshared)['total_params']
  tokens = _tokens(tokenizer)
  np.testing.assert_array_equal(
    np.asarray(loaded.apply(loaded_vars, tokens)), np.asarray(model.apply(variables, tokens))
  )


@pytest.mark.slow
@pytest.mark.parametrize('variant', FAMILY_PRESETS)
def test_every_family_round_trips_through_an_export(tmp_path, variant):
  """Randomly initialised tiny model of each family: export -> load_export gives the same logits."""
  import importlib  # pylint: disable=import-outside-toplevel

  config = importlib.import_module(f'effjax.configs.{variant}').get_config('tiny')
  tok = tokenizers.CharTokenizer('abcdefghijklmnopqrstuvwxyz \n():=+')
  tok.save(str(tmp_path))
  config.model.vocab_size = tok.vocab_size
  model = build_model(config.model)
  tokens = jnp.asarray(np.arange(32, dtype=np.int32)[None] % tok.vocab_size)
  variables = nn.unbox({k: v for k, v in model.init(jax.random.key(1), tokens).items() if k != 'cache'})
  checkpoint.export(
    str(tmp_path / 'export'),
    variables,
    config,
    str(tmp_path / 'tokenizer.json'),
    {'step': 0, 'tokens_seen': 0},
    'float32',
  )
  loaded, loaded_vars, loaded_config = effjax.load_export(str(tmp_path / 'export'))
  assert loaded_config.model.family == config.model.family
  np.testing.assert_array_equal(
    np.asarray(loaded.apply(loaded_vars, tokens)), np.asarray(model.apply(variables, tokens))
  )


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
  """The export is written to a temporary sibling and renamed: a failure midway leaves no partial export."""
  config = tiny_config('unused')
  tok = tokenizers.CharTokenizer('abc')
  tok.save(str(tmp_path))
  config.model.vocab_size = tok.vocab_size
  variables = state_lib.abstract_variables(config.model)
  variables = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), {'params': variables['params']})
  real = checkpoint.write_json_atomic

  def failing(path, obj):
    if path.endswith('metadata.json'):
      raise OSError(28, 'No space left on device')
    return real(path, obj)

  monkeypatch.setattr(checkpoint, 'write_json_atomic', failing)
  with pytest.raises(OSError):
    checkpoint.export(str(tmp_path / 'export'), variables, config, str(tmp_path / 'tokenizer.json'), {}, 'float32')
  assert sorted(os.listdir(tmp_path)) == ['tokenizer.json']
  monkeypatch.setattr(checkpoint, 'write_json_atomic', real)
  with pytest.raises(EffjaxError, match='is not an effjax export|does not exist'):
    effjax.load_export(str(tmp_path / 'export'))
