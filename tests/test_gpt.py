"""The baseline GPT: shapes, learning, sampling filters, bf16 and the sliding window (causality, the KV cache, scan ==
unrolled, resume and meshes: tests/test_contract.py)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from effjax.configs import gpt as gpt_config
from effjax import accounting, sample
from effjax.models import build_model


def model_config(**overrides):
  m = gpt_config.get_config('tiny').model
  m.vocab_size = 50
  m.update(overrides)
  return m


def init(m, seed=0, length=16):
  model = build_model(m)
  return model, nn.unbox(model.init(jax.random.key(seed), jnp.zeros((2, length), jnp.int32)))


@pytest.mark.slow
@pytest.mark.parametrize('pos_emb', ['learned', 'rotary'])
def test_forward_shapes_and_dtype(pos_emb):
  model, variables = init(model_config(pos_emb=pos_emb))
  logits = model.apply(variables, jnp.ones((3, 16), jnp.int32))
  assert logits.shape == (3, 16, 50) and logits.dtype == jnp.float32


def test_gpt2_small_param_count():
  c = gpt_config.get_config('paper')
  assert accounting.param_counts(c.model)['total_params'] == 124_439_808


def test_tiny_model_overfits_one_batch():
  model, variables = init(model_config(), length=16)
  tokens = jax.random.randint(jax.random.key(3), (4, 17), 0, 50)
  opt = optax.adam(3e-3)
  params = variables['params']
  state = opt.init(params)

  @jax.jit
  def step(params, state):
    def loss_fn(p):
      logits = model.apply({'params': p}, tokens[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    loss, g = jax.value_and_grad(loss_fn)(params)
    updates, state = opt.update(g, state, params)
    return optax.apply_updates(params, updates), state, loss

  first = None
  for _ in range(150):
    params, state, loss = step(params, state)
    first = float(loss) if first is None else first
  assert first > 3.5 and float(loss) < 0.1, (first, float(loss))


def test_sampling_filters():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  top2 = sample.filter_logits(logits, 1.0, 2, 1.0)
  assert np.isfinite(np.asarray(top2)).tolist() == [[True, True, False, False]]
  nucleus = sample.filter_logits(logits, 1.0, 0, 0.7)
  assert np.isfinite(np.asarray(nucleus)).tolist() == [[True, True, False, False]]


@pytest.mark.slow
def test_bf16_compute_runs_and_stays_close():
  m32 = model_config()
  model32, variables = init(m32)
  m16 = ml_collections.ConfigDict(m32.to_dict())
  m16.dtype = 'bfloat16'
  tokens = jax.random.randint(jax.random.key(5), (2, 16), 0, 50)
  a = model32.apply(variables, tokens)
  b = build_model(m16).apply(variables, tokens)
  assert b.dtype == jnp.float32
  assert float(jnp.abs(jax.nn.softmax(a) - jax.nn.softmax(b)).max()) < 0.05


@pytest.mark.slow
def test_generation_longer_than_context_slides_the_window():
  m = model_config(max_len=16)
  model, variables = init(m)
  prompt = jax.random.randint(jax.random.key(6), (2, 5), 0, 50)
  out = sample.generate(model, variables, prompt, jax.random.key(0), max_new_tokens=40, temperature=0.0)
  assert out.shape == (2, 40)
  # the first chunk (inside the context) is exactly the cached greedy continuation
  first = sample.generate_cached(model, variables, prompt, jax.random.key(0), max_new_tokens=11, temperature=0.0)
  np.testing.assert_array_equal(out[:, :11], np.asarray(first))
