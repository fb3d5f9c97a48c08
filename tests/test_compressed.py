"""lc-gpt and cc-gpt: the paper's parameter counts, widths, the causal convolution's window, kernel-1 conv == linear
and width errors (causality, the KV and conv-state cache, resume and meshes, with kernel 3 too:
tests/test_contract.py)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from effjax.configs import ccgpt, lcgpt
from effjax import accounting
from effjax.errors import EffjaxError
from effjax.models import build_model, compressed
from tests.helpers import close

V = 50
CONFIGS = {'lcgpt': lcgpt, 'ccgpt': ccgpt}


def model_config(family='lcgpt', **overrides):
  m = CONFIGS[family].get_config('tiny').model
  m.vocab_size = V
  m.update(overrides)
  return m


def init(m, seed=0, length=16):
  model = build_model(m)
  return model, nn.unbox(jax.jit(model.init)(jax.random.key(seed), jnp.zeros((2, length), jnp.int32)))


# ---------------------------------------------------------------------------------------------------------
# configs and counts


def test_presets_build_and_unknown_preset_is_an_error():
  for module, presets in ((lcgpt, ('', 'tiny', 'paper')), (ccgpt, ('', 'tiny', 'paper', 'k3'))):
    for preset in presets:
      c = module.get_config(preset)
      c.model.vocab_size = c.model.vocab_size or 100
      build_model(c.model)
  assert ccgpt.get_config('k3').model.compress.conv_kernel == 3
  with pytest.raises(EffjaxError, match="unknown preset 'nope' for configs/ccgpt.py"):
    ccgpt.get_config('nope')


@pytest.mark.parametrize('module', [lcgpt, ccgpt])
def test_paper_param_counts_exact(module):
  """5.65 M / 21.54 MB for both: widths 384 → 192 → 96, a compressor after every 2 blocks, head 96 → V."""
  s = accounting.summarize(module.get_config('paper'))
  assert (s['total_params'], s['param_mb']) == (5_647_204, 21.54)
  assert s['widths'] == [384, 192, 96] and s['head_width'] == 96
  assert s['segment_params'] == [2 * 1_774_464, 2 * 444_864]
  assert s['compressor_params'] == [384 * 192 + 192, 192 * 96 + 96]


def test_segments_when_depth_is_not_a_multiple_of_n():
  m = model_config(num_layers=5, d_model=64, compress=dict(compress_every=2))
  assert compressed.segments(m) == [(64, 2), (32, 2), (16, 1)]
  assert compressed.compressions(m) == [(64, 32), (32, 16)] and compressed.final_width(m) == 16
  shapes = jax.eval_shape(build_model(m).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params']
  assert nn.unbox(shapes)['head']['head']['kernel'].shape == (16, V)
  assert jax.tree.leaves(nn.unbox(shapes)['stack_2'])[0].shape[0] == 1  # one block at width 16


def test_conv_kernel_scales_compressor_params_and_flops():
  k1, k3 = model_config('ccgpt', compress=dict(conv_kernel=1)), model_config('ccgpt', compress=dict(conv_kernel=3))
  weights = sum(a * b for a, b in compressed.compressions(k1))
  assert accounting.param_counts(k3)['total_params'] - accounting.param_counts(k1)['total_params'] == 2 * weights
  assert accounting.flops_per_token(k3, 32) - accounting.flops_per_token(k1, 32) == 4 * weights


# ---------------------------------------------------------------------------------------------------------
# numerics


def test_causal_conv_sees_exactly_the_last_k_positions():
  cfg = ml_collections.FrozenConfigDict(model_config('ccgpt'))
  conv = compressed.CausalConv1d(cfg, features=4, kernel=3)
  x = jax.random.normal(jax.random.key(0), (1, 10, 8))
  params = conv.init(jax.random.key(1), x)
  jac = jax.grad(lambda x: conv.apply(params, x)[0, 6, 0])(x)  # output position 6, channel 0
  seen = np.flatnonzero(np.abs(np.asarray(jac[0])).sum(-1) > 0)
  assert seen.tolist() == [4, 5, 6]


def test_kernel1_conv_equals_linear_with_the_same_weights():
  lc, cc = model_config('lcgpt'), model_config('ccgpt', compress=dict(conv_kernel=1))
  lc_model, variables = init(lc)
  params = dict(variables['params'])
  for name in ('compress_0', 'compress_1'):
    dense = params.pop(name)
    params[name] = {'conv': {'kernel': dense['kernel'][None], 'bias': dense['bias']}}
  tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, V)
  close(build_model(cc).apply({'params': params}, tokens), lc_model.apply(variables, tokens))


@pytest.mark.parametrize(
  'overrides,pattern',
  [
    (
      {'d_model': 12, 'num_heads': 3, 'num_layers': 6},
      r'model.compress.compress_factor=2 does not divide the width 3 ',
    ),
    ({'d_model': 48, 'num_heads': 8, 'num_layers': 6}, r'model.num_heads=8 does not divide the compressed width 12'),
    ({'compress': {'compress_factor': 1}}, r'model.compress.compress_factor=1 is invalid'),
    ({'compress': {'compress_every': 0}}, r'model.compress.compress_every=0 is invalid'),
    ({'tie_embeddings': True}, r'model.tie_embeddings=True does not fit lcgpt'),
  ],
)
def test_bad_widths_are_one_line_errors(overrides, pattern):
  with pytest.raises(EffjaxError, match=pattern):
    build_model(model_config('lcgpt', **overrides))


def test_bad_conv_kernel_is_an_error():
  with pytest.raises(EffjaxError, match=r'model.compress.conv_kernel=0 is invalid'):
    build_model(model_config('ccgpt', compress=dict(conv_kernel=0)))
