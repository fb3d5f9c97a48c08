"""Claims about the low-rank dense kind (effjax/models/lowrank.py): W = U·V exactly, its counts, its init scale,
and a lowrank:tiny run that learns."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax import accounting, train
from effjax.configs import lowrank as lowrank_config
from effjax.errors import EffjaxError
from effjax.models import build_model, lowrank
from effjax.models import structured as st
from tests.helpers import train_losses, variant_config


def _init(layer, d_in, seed=0):
  x = jnp.asarray(np.random.default_rng(seed).standard_normal((3, d_in)), jnp.float32)
  return nn.unbox(jax.jit(layer.init)(jax.random.key(seed), x)), x


def test_layer_is_x_times_u_times_v_plus_bias_with_its_counts():
  layer = st.make_dense('lowrank', lowrank_rank=4)(features=24, kernel_axes=('embed', 'mlp'))
  variables, x = _init(layer, 16)
  p = variables['params']
  assert p['u'].shape == (16, 4) and p['v'].shape == (4, 24)
  np.testing.assert_allclose(st.dense_matrix(layer, variables, 16), p['u'] @ p['v'], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(layer.apply(variables, x), x @ p['u'] @ p['v'] + p['bias'], rtol=1e-5, atol=1e-6)
  assert sum(a.size for a in jax.tree.leaves(p)) == st.dense_params('lowrank', 16, 24, lowrank_rank=4) == 184
  assert st.dense_params('lowrank', 16, 24, use_bias=False, lowrank_rank=4) == 160
  assert st.dense_flops('lowrank', 1024, 4096, lowrank_rank=64) == 2 * 64 * (1024 + 4096)
  specs = nn.get_partition_spec(jax.eval_shape(layer.init, jax.random.key(0), x))['params']
  assert tuple(specs['u']) == ('embed', None) and tuple(specs['v']) == (None, 'mlp')


def test_product_starts_at_the_dense_init_std():
  """U·V entries have std 0.02 like GPT-2's dense kernels; a residual projection's smaller std is honoured."""
  for std in (0.02, 0.005):
    layer = lowrank.LowRankDense(512, rank=32, **st.residual_init('lowrank', std))
    variables, _ = _init(layer, 256)
    w = variables['params']['u'] @ variables['params']['v']
    assert abs(float(jnp.std(w)) / std - 1) < 0.05, (std, float(jnp.std(w)))


def _tiny_model_config():
  m = lowrank_config.get_config('tiny').model
  m.vocab_size = 50
  return m


def test_tiny_summary_params_and_flops_are_exact():
  """lowrank:tiny (L=2, D=64, F=256, r=8, ctx 32, tied, V=50): every projection costs r·(in+out) + bias."""
  config = lowrank_config.get_config('tiny')
  config.model.vocab_size = 50
  d, f, r, v, t = 64, 256, 8, 50, 32
  attn = 4 * (r * (d + d) + d)
  mlp = r * (d + f) + f + r * (f + d) + d
  block = attn + mlp + 2 * 2 * d  # + ln1, ln2 (scale and bias)
  total = 2 * block + v * d + t * d + 2 * d  # + token table, position table, final norm
  summary = accounting.summarize(config)
  assert summary['total_params'] == summary['trainable_params'] == total == 25_472
  block_flops = 4 * 2 * r * (d + d) + 4 * t * d + 2 * 2 * r * (d + f)
  assert summary['flops_per_token'] == 2 * block_flops + 2 * d * v == 59_648
  dense_block = 4 * (d * d + d) + d * f + f + f * d + d + 2 * 2 * d
  assert summary['emulated_params'] == 2 * dense_block + v * d + t * d + 2 * d == 105_344
  params = jax.eval_shape(build_model(config.model).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  attn_q = nn.unbox(params)['params']['stack']['layers']['attn']['query']
  assert set(attn_q) == {'u', 'v', 'bias'}


def test_bad_rank_is_one_line():
  m = _tiny_model_config()
  m.dense.lowrank_rank = 0
  with pytest.raises(EffjaxError, match=r'^model\.dense\.lowrank_rank=0 is invalid; it must be a positive integer$'):
    build_model(m)


@pytest.mark.slow
def test_tiny_trains_and_the_loss_decreases(tmp_path, corpus_dir):
  config = variant_config(lowrank_config, corpus_dir, **{'train.steps': 40, 'train.log_every': 10})
  train.train_and_evaluate(config, str(tmp_path / 'run'))
  losses = train_losses(tmp_path / 'run')
  assert losses[40] < losses[10] - 0.5, losses
