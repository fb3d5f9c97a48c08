"""The one sampling loop: it sees the model only through `tokens_to_logits` (lm1b's temperature_sample test)."""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from effjax import config_lookup, sample
from effjax.models import build_model, layers


def _next_is_plus_one(token_B, i, calls):
  """A fake model: the token after t is t + 1 (one-hot logits), counting its calls in the state."""
  return jax.nn.one_hot(token_B + 1, 10) * 100.0, calls + 1


def test_sample_loop_with_a_fake_tokens_to_logits():
  start_BxV = jax.nn.one_hot(jnp.array([5]), 10) * 100.0
  out = sample.sample_loop(
    _next_is_plus_one, start_BxV, jnp.int32(0), jax.random.key(0), max_new_tokens=4, temperature=0.0
  )
  np.testing.assert_array_equal(out, [[5, 6, 7, 8]])
  sampled = sample.sample_loop(
    _next_is_plus_one, start_BxV, jnp.int32(0), jax.random.key(0), max_new_tokens=4, temperature=1.0, top_k=1
  )
  np.testing.assert_array_equal(sampled, [[5, 6, 7, 8]])


def test_rows_of_a_batch_sample_independently():
  start_BxV = jax.nn.one_hot(jnp.array([2, 0]), 10) * 100.0
  out = sample.sample_loop(
    _next_is_plus_one, start_BxV, jnp.int32(0), jax.random.key(0), max_new_tokens=6, temperature=0.0
  )
  np.testing.assert_array_equal(out, [[2, 3, 4, 5, 6, 7], [0, 1, 2, 3, 4, 5]])


def test_decoding_layout_keeps_every_weight_and_transposes_only_dense_kernels():
  """On CPU the sampler unrolls the stack and stores each plain dense kernel [out, in]: a kernel of the decode
  layout is the transpose of layer i's slice of the scanned kernel, every other leaf is the same array, and the
  relaid-out model computes the same logits."""
  m = config_lookup._builtin_module('gpt').get_config('tiny').model  # pylint: disable=protected-access
  m.vocab_size = 64
  model = build_model(m)
  tokens = jax.random.randint(jax.random.key(1), (2, 6), 0, m.vocab_size)
  variables = nn.unbox(model.init(jax.random.key(0), tokens))
  decoding, relaid = sample.decoding_layout(model, variables)
  assert layers.out_major(decoding.cfg) and not decoding.cfg.scan_layers and m.scan_layers
  scanned = flax.traverse_util.flatten_dict(variables['params'])
  kernels = 0
  for path, value in flax.traverse_util.flatten_dict(relaid['params']).items():
    layer = next((int(k[6:]) for k in path if k.startswith('layer_')), None)
    source = tuple('layers' if k.startswith('layer_') else k for k in path)
    want = scanned[source] if layer is None else scanned[source][layer]
    if path[-1] == 'kernel':
      want, kernels = want.T, kernels + 1
    np.testing.assert_array_equal(value, want)
  assert kernels == 6 * m.num_layers  # query, key, value, out, fc, proj; the tied head reads the table as stored
  np.testing.assert_allclose(decoding.apply(relaid, tokens), model.apply(variables, tokens), rtol=1e-5, atol=1e-5)


def test_relayout_like_refuses_leaves_it_cannot_map():
  """Axis names that are not a permutation of the source's (or a missing leaf) give None, not a guess."""
  src = {'w': nn.Partitioned(jnp.zeros((2, 3)), ('embed', 'mlp'))}
  assert layers.relayout_like({'w': jnp.ones((2, 3))}, src, {'w': nn.Partitioned(jnp.zeros((3, 2)), ('mlp', 'embed'))})[
    'w'
  ].shape == (3, 2)
  assert (
    layers.relayout_like({'w': jnp.ones((2, 3))}, src, {'w': nn.Partitioned(jnp.zeros((3, 2)), ('mlp', 'vocab'))})
    is None
  )
  assert layers.relayout_like({}, src, src) is None
