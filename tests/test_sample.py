"""The one sampling loop: it sees the model only through `tokens_to_logits` (lm1b's temperature_sample test)."""

import jax
import jax.numpy as jnp
import numpy as np

from effjax import sample


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
