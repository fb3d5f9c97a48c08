"""Autoregressive sampling. With a KV cache the prompt is processed once (prefill) and each new token costs one
position; without it every step re-runs the whole fixed-length buffer (kept for checking the cache)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from effjax.errors import EffjaxError


def filter_logits(logits_BxV: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
  """Temperature, top-k and nucleus (top-p) filtering; masked entries become -inf."""
  logits_BxV = logits_BxV.astype(jnp.float32) / temperature
  if top_k and top_k < logits_BxV.shape[-1]:
    kth = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth, -jnp.inf, logits_BxV)
  if top_p < 1.0:
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    cum_BxV = jnp.cumsum(jax.nn.softmax(sorted_BxV, axis=-1), axis=-1)
    # keep the smallest prefix whose mass reaches top_p (always at least the best token)
    cutoff_idx = jnp.sum(cum_BxV < top_p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(sorted_BxV, cutoff_idx, axis=-1)
    logits_BxV = jnp.where(logits_BxV < cutoff, -jnp.inf, logits_BxV)
  return logits_BxV


def _choose(logits_BxV, key, temperature, top_k, top_p):
  if temperature == 0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, filter_logits(logits_BxV, temperature, top_k, top_p)).astype(jnp.int32)


def check_request(prompt_len: int, max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
  if prompt_len == 0:
    raise EffjaxError('--prompt is empty after tokenization; give at least one character')
  if max_new_tokens <= 0:
    raise EffjaxError(f'--max_new_tokens={max_new_tokens} is invalid; it must be a positive integer')
  if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
    raise EffjaxError(f'--temperature={temperature}, --top_k={top_k}, --top_p={top_p} are invalid; need '
                      'temperature >= 0, top_k >= 0, 0 < top_p <= 1')


@functools.partial(jax.jit, static_argnames=('model', 'max_new_tokens', 'temperature', 'top_k', 'top_p'))
def generate_cached(model, variables, prompt_BxP, key, *, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0):
  b = prompt_BxP.shape[0]
  cache = jax.eval_shape(lambda: model.init(jax.random.key(0), prompt_BxP[:, :1], decode=True))['cache']
  cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cache)
  logits, mutated = model.apply({**variables, 'cache': cache}, prompt_BxP, decode=True, mutable=['cache'])
  first = _choose(logits[:, -1], jax.random.fold_in(key, 0), temperature, top_k, top_p)

  def body(carry, i):
    token_B, cache = carry
    logits, mutated = model.apply({**variables, 'cache': cache}, token_B[:, None], decode=True,
                                  mutable=['cache'])
    nxt = _choose(logits[:, -1], jax.random.fold_in(key, i), temperature, top_k, top_p)
    return (nxt, mutated['cache']), token_B

  (last, _), tokens_NxB = jax.lax.scan(body, (first, mutated['cache']), jnp.arange(1, max_new_tokens))
  return jnp.concatenate([tokens_NxB.T, last[:, None]], axis=1).reshape(b, max_new_tokens)


@functools.partial(jax.jit, static_argnames=('model', 'max_new_tokens', 'temperature', 'top_k', 'top_p'))
def generate_uncached(model, variables, prompt_BxP, key, *, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0):
  b, p = prompt_BxP.shape
  buffer = jnp.zeros((b, p + max_new_tokens), jnp.int32).at[:, :p].set(prompt_BxP)

  def body(buffer, i):
    logits = model.apply(variables, buffer)
    nxt = _choose(jax.lax.dynamic_index_in_dim(logits, p + i - 1, axis=1, keepdims=False),
                  jax.random.fold_in(key, i), temperature, top_k, top_p)
    return jax.lax.dynamic_update_slice(buffer, nxt[:, None], (0, p + i)), None

  buffer, _ = jax.lax.scan(body, buffer, jnp.arange(max_new_tokens))
  return buffer[:, p:]


def generate(model, variables, prompt_BxP, key, *, max_new_tokens: int, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
  """KV-cached generation of any length. Within the context it is one cached pass; past model.max_len the
  cache is refilled from the last max_len/2 tokens (a sliding window, as nanoGPT crops its context)."""
  max_len = model.cfg.max_len
  keep = max(max_len // 2, 1)
  tokens_BxL = np.asarray(prompt_BxP, np.int32)
  if tokens_BxL.shape[1] >= max_len:
    tokens_BxL = tokens_BxL[:, -keep:]
  context, new, chunk = tokens_BxL, [], 0
  remaining = max_new_tokens
  while remaining > 0:
    n = min(remaining, max_len - context.shape[1])
    out = generate_cached(model, variables, jnp.asarray(context), jax.random.fold_in(key, chunk),
                          max_new_tokens=n, temperature=temperature, top_k=top_k, top_p=top_p)
    new.append(np.asarray(out))
    remaining -= n
    chunk += 1
    context = np.concatenate([context, new[-1]], axis=1)[:, -keep:]
  return np.concatenate(new, axis=1)


def sample_text(model, variables, tokenizer, prompt: str, *, max_new_tokens: int, temperature: float,
                top_k: int, top_p: float, seed: int, num_samples: int = 1) -> list[str]:
  ids = np.asarray(tokenizer.encode(prompt), np.int32)
  check_request(len(ids), max_new_tokens, temperature, top_k, top_p)
  out = generate(model, variables, np.tile(ids[None], (num_samples, 1)), jax.random.key(seed),
                 max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=int(top_k),
                 top_p=float(top_p))
  return [tokenizer.decode(row) for row in out]
