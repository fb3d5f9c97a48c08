"""Doped models (seed 004, §3): frozen random MLPs between trainable blocks — they never change, get no gradient
and no optimizer state, are checkpointed and shard (causality, the KV cache, resume and meshes:
tests/test_contract.py)."""

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from effjax.configs import doped as doped_config
from effjax import checkpoint, metrics, state as state_lib, train
from effjax.errors import EffjaxError
from effjax.models import build_model, doped, layers
from tests.helpers import run_cli, variant_config

V = 50


def model_config(**overrides):
  m = doped_config.get_config('tiny').model
  m.vocab_size = V
  m.update(overrides)
  return m


def run_config(corpus, **overrides):
  return variant_config(doped_config, corpus, **overrides)


def init(m, seed=0):
  model = build_model(m)
  return model, nn.unbox(jax.jit(model.init)(jax.random.key(seed), jnp.zeros((2, 16), jnp.int32)))


def count(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


def nbytes(tree):
  return sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def unstack_runs(collection):
  """Scanned doped layout stack/run_i/layers/X[n,...] -> the unrolled one stack/run_i/layer_j/X."""
  return {**collection, 'stack': {run: layers.unstack_layers(sub) for run, sub in collection['stack'].items()}}


# ---------------------------------------------------------------------------------------------------------
# the layout


@pytest.mark.parametrize(
  'doping,num_layers,expected',
  [
    ('interleave', 3, (1, 1, 0)),
    ('interleave', 1, (0,)),
    ('TFTFT', 3, (1, 1, 0)),
    ('TFFTTFT', 4, (2, 0, 1, 0)),
    ('TT', 2, (0, 0)),
    ('', 2, (0, 0)),
  ],
)
def test_pattern_gives_frozen_mlps_after_each_trainable_block(doping, num_layers, expected):
  assert doped.parse_doping(doping, num_layers) == expected


def test_tiny_preset_is_tftft_and_presets_build():
  assert doped.pattern(model_config()) == 'TFTFT'
  for preset in ('', 'tiny', 'nodoping'):
    c = doped_config.get_config(preset)
    c.model.vocab_size = 100
    build_model(c.model)
  assert doped_config.get_config('nodoping').model.doping.pattern == ''
  with pytest.raises(EffjaxError, match="unknown preset 'nope' for configs/doped.py"):
    doped_config.get_config('nope')


@pytest.mark.parametrize(
  'overrides,pattern',
  [
    (
      {'doping': {'pattern': 'FTT'}, 'num_layers': 2},
      r"model.doping.pattern='FTT' is invalid: the first and last layers must be trainable",
    ),
    ({'doping': {'pattern': 'TTF'}, 'num_layers': 2}, r'first and last layers must be trainable'),
    ({'doping': {'pattern': 'TXT'}, 'num_layers': 2}, r"model.doping.pattern='TXT' is invalid: 'X' is not T or F"),
    ({'doping': {'pattern': 'tft'}, 'num_layers': 2}, r"'ft' is not T or F"),
    (
      {'doping': {'pattern': 'TFTFT'}, 'num_layers': 5},
      r"model.doping.pattern='TFTFT' has 3 trainable blocks \(T\) but model.num_layers=5; .* set it to 3",
    ),
    ({'doping': {'frozen_mlp_ratio': 0}}, r'model.doping.frozen_mlp_ratio=0 is invalid; it must be a positive integer'),
    ({'share_layers': 'all'}, r"model.doping.pattern='interleave' needs model.share_layers='none'"),
  ],
)
def test_bad_doping_is_one_clear_error(overrides, pattern):
  with pytest.raises(EffjaxError, match=pattern):
    build_model(model_config(**overrides))


def test_doping_refused_by_families_that_ignore_it():
  with pytest.raises(EffjaxError, match=r"model.doping.pattern='interleave' is not supported by model.family='pgpt'"):
    doped.check(model_config(), 'pgpt')


@pytest.mark.slow
def test_frozen_layers_add_only_frozen_params_with_logical_axes():
  """The doped model's trainable params are exactly those of the undoped model with the same blocks; each frozen
  layer is W1 [d, r·d] + W2 [r·d, d] in 'frozen', stacked with the 'layers' axis, distinct per layer."""
  m = model_config()
  _, variables = init(m)
  _, plain = init(model_config(doping=dict(pattern='')))
  d, r = m.d_model, m.doping.frozen_mlp_ratio
  assert count(variables['params']) == count(plain['params'])
  assert count(variables['frozen']) == 2 * (2 * r * d * d)
  boxed = jax.eval_shape(lambda: build_model(m).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  frozen = boxed['frozen']['stack']['run_0']['layers']['frozen_0']
  assert frozen['fc'].names == ('layers', 'embed', 'mlp') and frozen['fc'].value.shape == (2, d, r * d)
  assert frozen['proj'].names == ('layers', 'mlp', 'embed') and frozen['proj'].value.shape == (2, r * d, d)
  fc = variables['frozen']['stack']['run_0']['layers']['frozen_0']['fc']
  assert not np.allclose(fc[0], fc[1])  # each frozen layer has its own random weights
  assert abs(float(fc.std()) - layers.INIT_STD) < 2e-3


@pytest.mark.slow
@pytest.mark.parametrize(
  'doping,num_layers,remat,norm_position', [('interleave', 3, 'none', 'pre'), ('TFFTTFT', 4, 'full', 'post')]
)
def test_scanned_equals_unscanned(doping, num_layers, remat, norm_position):
  m = model_config(doping=dict(pattern=doping), num_layers=num_layers, remat=remat, norm_position=norm_position)
  model, variables = init(m)
  unrolled = build_model(ml_collections.ConfigDict({**m.to_dict(), 'scan_layers': False}))
  tokens = jax.random.randint(jax.random.key(3), (2, 16), 0, V)
  converted = {k: unstack_runs(v) for k, v in variables.items()}
  expected = nn.unbox(jax.eval_shape(lambda: unrolled.init(jax.random.key(0), tokens)))
  assert jax.tree.map(lambda x: x.shape, expected) == jax.tree.map(lambda x: x.shape, converted)
  np.testing.assert_allclose(
    np.asarray(model.apply(variables, tokens)), np.asarray(unrolled.apply(converted, tokens)), atol=1e-5, rtol=1e-5
  )


@pytest.mark.slow
def test_frozen_layers_are_used_and_get_no_gradient():
  m = model_config()
  model, variables = init(m)
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, V)

  def loss(frozen):
    logits = model.apply({**variables, 'frozen': frozen}, tokens)
    return -jax.nn.log_softmax(logits)[..., 0].mean()

  zeroed = jax.tree.map(jnp.zeros_like, variables['frozen'])
  assert abs(float(loss(variables['frozen']) - loss(zeroed))) > 1e-4  # the frozen MLPs change the output
  grads = jax.grad(loss)(variables['frozen'])  # stop_gradient: no gradient reaches them even if asked
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))


# ---------------------------------------------------------------------------------------------------------
# training: frozen weights never change, have no optimizer state, shard, checkpoint and resume


@pytest.mark.slow
def test_train_steps_leave_frozen_bit_identical_and_optimizer_holds_only_trainable(corpus_dir):
  config = run_config(corpus_dir, **{'model.vocab_size': V, 'model.dropout': 0.1, 'mesh.fsdp': 2})
  setup = state_lib.make_setup(config)
  state = setup.init_fn(jax.random.key(config.seed))
  params0, frozen0 = jax.device_get(state.params), jax.device_get(state.extra['frozen'])
  # Adam keeps mu and nu for the trainable params and nothing else: 2 x the trainable bytes
  adam = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda s: hasattr(s, 'mu')) if hasattr(s, 'mu')]
  assert len(adam) == 1
  assert jax.tree.structure(adam[0].mu) == jax.tree.structure(state.params)
  assert nbytes(adam[0].mu) + nbytes(adam[0].nu) == 2 * nbytes(state.params)
  assert not any(
    'frozen' in jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(state.opt_state)
  )
  step = train.make_train_step(setup, config)
  rng = np.random.default_rng(0)
  for _ in range(5):
    tokens = rng.integers(0, V, (config.train.batch_size, config.data.seq_len + 1), dtype=np.int32)
    batch = train._shard(setup, {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:]})  # pylint: disable=protected-access
    state, _ = step(state, batch)
  assert int(state.step) == 5
  assert any(
    not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params0), jax.tree.leaves(jax.device_get(state.params)))
  )
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.extra['frozen']), frozen0)


@pytest.mark.slow
def test_checkpoint_stores_the_frozen_weights_sharded_and_metrics_count_both_accountings(tmp_path, corpus_dir):
  """On data=2 x fsdp=4 the frozen weights shard over fsdp, the checkpointed ones are those of a fresh init with
  the seed, and the metrics log cumulative compute under both accountings. (Resume and meshes:
  tests/test_contract.py.)"""
  overrides = {
    'train.steps': 8,
    'train.log_every': 1,
    'checkpoint.every': 4,
    'model.dropout': 0.1,
    'train.eval_every': 100,
  }
  mesh = {'mesh.data': 2, 'mesh.fsdp': 4}
  train.train_and_evaluate(run_config(corpus_dir, **overrides, **mesh), str(tmp_path / 'straight'))

  config = train.resolve_vocab(run_config(corpus_dir, **overrides, **mesh), _tokenizer(tmp_path / 'straight'))
  setup = state_lib.make_setup(config)
  frozen = setup.state_shardings.extra['frozen']['stack']['run_0']['layers']['frozen_0']
  assert frozen['fc'].spec == P(None, 'fsdp', None) and frozen['proj'].spec == P(None, None, 'fsdp')
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'straight' / 'checkpoints'), 3)
  try:
    restored, meta = ckpt.restore(8, setup.abstract_state)
  finally:
    ckpt.close()
  assert meta['step'] == 8
  fresh = setup.init_fn(jax.random.key(config.seed))
  jax.tree.map(
    np.testing.assert_array_equal, jax.device_get(restored.extra['frozen']), jax.device_get(fresh.extra['frozen'])
  )
  assert any(
    not np.array_equal(a, b)
    for a, b in zip(jax.tree.leaves(jax.device_get(restored.params)), jax.tree.leaves(jax.device_get(fresh.params)))
  )

  m, d, r = config.model, config.model.d_model, config.model.doping.frozen_mlp_ratio
  n_frozen = 2 * 2 * r * d * d
  n_train = m.num_layers * (12 * d * d + 13 * d) + 2 * d  # blocks + ln_f (tied head, learned positions: embedding)
  tokens = config.train.batch_size * config.data.seq_len
  last = [x for x in metrics.read_metrics(tmp_path / 'straight') if x['split'] == 'train'][-1]
  assert last['compute'] == 8 * (6 * n_train + 4 * n_frozen) * tokens
  assert last['compute_frozen_free'] == 8 * 6 * n_train * tokens


def _tokenizer(workdir):
  from effjax.data import tokenizers  # pylint: disable=import-outside-toplevel

  return tokenizers.load_tokenizer(str(workdir / 'data'))


# ---------------------------------------------------------------------------------------------------------
# the CLI


def test_cli_summary_of_doped_medium_is_fast_and_reports_frozen(tmp_path):
  """Doped Medium: 12 trainable blocks of d=1024 and 11 frozen MLPs of hidden 6d, BPE 50262, rotary, tied."""
  d, v = 1024, 50262
  trainable = 12 * (12 * d * d + 13 * d) + v * d + 2 * d
  frozen = 11 * 12 * d * d
  t0 = time.time()
  result = run_cli('--config=configs/doped.py:medium', '--mode=summary', f'--workdir={tmp_path}', timeout=120)
  elapsed = time.time() - t0
  assert result.returncode == 0, result.stderr
  assert elapsed < 60, elapsed
  assert f'{trainable:,}' in result.stdout and f'{frozen:,}' in result.stdout
  assert f'{trainable + frozen:,}' in result.stdout
  assert 'TFTFTFTFTFTFTFTFTFTFTFT' in result.stdout
