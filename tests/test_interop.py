"""Hugging Face GPT-2 <-> effjax (effjax/convert/hf_gpt2.py): logits agree to 1e-4 in both directions.

The GPT-2 models are built here with random weights (no download); biases and LayerNorm parameters are
perturbed too, so every tensor of the mapping matters.
"""

from __future__ import annotations

import hashlib
import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import effjax  # noqa: E402  pylint: disable=wrong-import-position
from effjax import checkpoint  # noqa: E402  pylint: disable=wrong-import-position
from effjax.convert import hf_gpt2  # noqa: E402  pylint: disable=wrong-import-position
from effjax.data import tokenizers  # noqa: E402  pylint: disable=wrong-import-position
from effjax.models import build_model  # noqa: E402  pylint: disable=wrong-import-position
from tests.test_bad_input import cli  # noqa: E402  pylint: disable=wrong-import-position

VOCAB, CTX, WIDTH, LAYERS, HEADS = 300, 32, 32, 2, 4


def _bpe_tokenizer_json(vocab_size: int) -> str:
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # pylint: disable=import-outside-toplevel

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    special_tokens=['<|endoftext|>'],
    show_progress=False,
  )
  tok.train_from_iterator(['def add(x, y):\n    return x + y\n'] * 20, trainer=trainer)
  return tok.to_str()


def _hf_logits(model, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()


def _tokens(seed=0) -> np.ndarray:
  return np.random.RandomState(seed).randint(0, VOCAB, (2, CTX)).astype(np.int32)


@pytest.fixture(scope='module')
def hf_model(tmp_path_factory):
  """A random GPT-2 saved as config.json + model.safetensors + tokenizer.json."""
  torch.manual_seed(0)
  config = transformers.GPT2Config(
    vocab_size=VOCAB, n_positions=CTX, n_embd=WIDTH, n_layer=LAYERS, n_head=HEADS, bos_token_id=0, eos_token_id=0
  )
  model = transformers.GPT2LMHeadModel(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  hf_dir = tmp_path_factory.mktemp('hf') / 'gpt2'
  model.save_pretrained(str(hf_dir))
  (hf_dir / 'tokenizer.json').write_text(_bpe_tokenizer_json(VOCAB))
  return model, hf_dir


@pytest.mark.slow
@pytest.mark.parametrize('scan_layers', [True, False])
def test_import_safetensors_logits_match(hf_model, tmp_path, scan_layers, capsys):
  model, hf_dir = hf_model
  args = [f'--hf_dir={hf_dir}', f'--export_dir={tmp_path}/export'] + ([] if scan_layers else ['--no-scan_layers'])
  assert hf_gpt2.main(args) == 0, capsys.readouterr().err
  ours, variables, config = effjax.load_export(str(tmp_path / 'export'))
  assert config.model.scan_layers == scan_layers and config.model.num_layers == LAYERS
  assert config.model.pos_emb == 'learned' and config.model.tie_embeddings and config.model.vocab_size == VOCAB
  tokens = _tokens()
  np.testing.assert_allclose(np.asarray(ours.apply(variables, tokens)), _hf_logits(model, tokens), atol=1e-4)
  metadata = json.loads((tmp_path / 'export' / 'metadata.json').read_text())
  assert metadata['family'] == 'gpt' and metadata['source'].startswith('hf_gpt2:')
  assert metadata['total_params'] == sum(p.numel() for p in model.parameters())  # lm_head is tied


def test_import_pytorch_model_bin(hf_model, tmp_path):
  model, hf_dir = hf_model
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  for name in ('config.json', 'tokenizer.json'):
    (bin_dir / name).write_bytes((hf_dir / name).read_bytes())
  torch.save(model.state_dict(), bin_dir / 'pytorch_model.bin')
  hf_gpt2.import_hf(str(bin_dir), str(tmp_path / 'export'))
  ours, variables, _ = effjax.load_export(str(tmp_path / 'export'))
  tokens = _tokens(1)
  np.testing.assert_allclose(np.asarray(ours.apply(variables, tokens)), _hf_logits(model, tokens), atol=1e-4)


def test_imported_model_samples_through_the_cli(hf_model, tmp_path):
  _, hf_dir = hf_model
  hf_gpt2.import_hf(str(hf_dir), str(tmp_path / 'export'))
  code, out, err = cli(
    f'--from_export={tmp_path}/export', '--mode=sample', '--prompt=def add', '--max_new_tokens=5', '--temperature=0'
  )
  assert code == 0, err
  assert out.startswith('def add')


def _effjax_export(tmp_path, **model_overrides):
  """A randomly initialised effjax GPT (learned positions, GELU, tied head) exported with a BPE tokenizer."""
  from effjax.configs import gpt  # pylint: disable=import-outside-toplevel

  config = gpt.get_config('tiny')
  config.model.update(vocab_size=VOCAB, max_len=CTX, d_model=WIDTH, num_heads=HEADS, num_layers=4, **model_overrides)
  config.data.tokenizer = 'bpe'
  model = build_model(config.model)
  variables = nn.unbox({k: v for k, v in model.init(jax.random.key(3), _tokens()).items() if k != 'cache'})
  # perturb every tensor (LayerNorm scales/biases start at 1/0)
  leaves, treedef = jax.tree.flatten(variables)
  keys = jax.random.split(jax.random.key(4), len(leaves))
  variables = jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
  (tmp_path / 'tokenizer.json').write_text(_bpe_tokenizer_json(VOCAB))
  checkpoint.export(
    str(tmp_path / 'export'),
    variables,
    config,
    str(tmp_path / 'tokenizer.json'),
    {'step': 0, 'tokens_seen': 0},
    'float32',
  )
  return model, variables


@pytest.mark.slow
@pytest.mark.parametrize(
  'overrides',
  [
    {},
    {'scan_layers': False},
    {'share_layers': 'all', 'embed_dim': 16},  # GPT-Efficio: written with the block repeated, table W·P
    {'share_layers': 'groups', 'num_groups': 2},
  ],
  ids=['plain', 'unscanned', 'shared_factorized', 'groups'],
)
def test_export_to_hf_logits_match(tmp_path, overrides, capsys):
  model, variables = _effjax_export(tmp_path, **overrides)
  assert hf_gpt2.main([f'--from_export={tmp_path}/export', f'--hf_dir={tmp_path}/hf', '--to_hf']) == 0, (
    capsys.readouterr().err
  )
  assert sorted(os.listdir(tmp_path / 'hf')) == ['config.json', 'model.safetensors', 'tokenizer.json']
  hf = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / 'hf')).eval()
  tokens = _tokens(2)
  np.testing.assert_allclose(_hf_logits(hf, tokens), np.asarray(model.apply(variables, tokens)), atol=1e-4)
  tok = tokenizers.load_tokenizer(str(tmp_path / 'hf'))
  assert tok.kind == 'bpe'


def test_round_trip_hf_effjax_hf(hf_model, tmp_path):
  model, hf_dir = hf_model
  hf_gpt2.import_hf(str(hf_dir), str(tmp_path / 'export'), scan_layers=False)
  hf_gpt2.export_to_hf(str(tmp_path / 'export'), str(tmp_path / 'back'))
  back = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / 'back')).eval()
  tokens = _tokens(3)
  np.testing.assert_allclose(_hf_logits(back, tokens), _hf_logits(model, tokens), atol=1e-5)


def _tree_hash(directory):
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      with open(os.path.join(root, name), 'rb') as f:
        out[os.path.join(root, name)] = hashlib.sha256(f.read()).hexdigest()
  return out


def test_refusals_are_one_line_and_write_nothing(hf_model, tmp_path, capsys):
  _, hf_dir = hf_model
  before = _tree_hash(hf_dir)
  # an existing directory is never overwritten
  (tmp_path / 'taken').mkdir()
  (tmp_path / 'taken' / 'keep.txt').write_text('mine')
  cases = [
    ([f'--hf_dir={hf_dir}', f'--export_dir={tmp_path}/taken'], 'already exists and is not empty'),
    ([f'--hf_dir={tmp_path}/none', f'--export_dir={tmp_path}/e1'], 'is not a directory'),
    ([f'--hf_dir={tmp_path}/taken', f'--export_dir={tmp_path}/e2'], 'no config.json'),
    ([f'--hf_dir={hf_dir}'], 'needs --export_dir'),
    ([f'--from_export={tmp_path}/none', f'--hf_dir={tmp_path}/h1', '--to_hf'], 'does not exist'),
    ([f'--hf_dir={hf_dir}', '--to_hf'], '--to_hf needs --from_export'),
  ]
  weights_missing = tmp_path / 'noweights'
  weights_missing.mkdir()
  (weights_missing / 'config.json').write_text((hf_dir / 'config.json').read_text())
  cases.append(([f'--hf_dir={weights_missing}', f'--export_dir={tmp_path}/e3'], 'no model.safetensors'))
  relu = tmp_path / 'relu'
  relu.mkdir()
  (relu / 'config.json').write_text(
    json.dumps({**json.loads((hf_dir / 'config.json').read_text()), 'activation_function': 'relu'})
  )
  cases.append(([f'--hf_dir={relu}', f'--export_dir={tmp_path}/e4'], "activation_function='relu'"))
  for args, pattern in cases:
    capsys.readouterr()
    assert _exit_code(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('effjax: error:') and pattern in err[0], (args, err)
  assert _tree_hash(hf_dir) == before
  assert (tmp_path / 'taken' / 'keep.txt').read_text() == 'mine'
  assert not any((tmp_path / n).exists() for n in ('e1', 'e2', 'e3', 'e4', 'h1'))


def test_architectures_gpt2_cannot_express_are_refused(tmp_path, capsys):
  _effjax_export(tmp_path, pos_emb='rotary', norm='rmsnorm')
  assert _exit_code([f'--from_export={tmp_path}/export', f'--hf_dir={tmp_path}/hf', '--to_hf']) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "model.pos_emb='rotary'" in err[0] and "model.norm='rmsnorm'" in err[0]
  assert not (tmp_path / 'hf').exists()


def _exit_code(args) -> int:
  """hf_gpt2.main's exit status, whether it returns it or argparse exits."""
  try:
    return hf_gpt2.main(args)
  except SystemExit as e:
    return e.code
