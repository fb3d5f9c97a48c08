"""Autoregressive sampling through one loop (`sample_loop`, driven by a `tokens_to_logits` callback). With a KV
cache the prompt is processed once (prefill) and each new token costs one position; without it every step
re-runs the whole fixed-length buffer (prompts of several lengths in a batch, and the check on the cache)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from effjax.errors import EffjaxError
from effjax.models import layers


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
    raise EffjaxError(
      f'--temperature={temperature}, --top_k={top_k}, --top_p={top_p} are invalid; need '
      'temperature >= 0, top_k >= 0, 0 < top_p <= 1'
    )


def sample_loop(
  tokens_to_logits,
  logits_BxV,
  state,
  key,
  *,
  max_new_tokens: int,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
) -> jax.Array:
  """The one sampling loop (lm1b's temperature_sample): it knows the model only through the callback
  `tokens_to_logits(token_B, i, state) -> (logits_BxV, state)`, which takes new token i and returns the logits of
  the token after it. Starts from the prompt's next-token logits; token i is drawn with fold_in(key, i).
  Returns the [B, max_new_tokens] new tokens (the callback runs max_new_tokens - 1 times)."""

  def body(carry, i):
    logits_BxV, state = carry
    token_B = _choose(logits_BxV, jax.random.fold_in(key, i), temperature, top_k, top_p)
    return tokens_to_logits(token_B, i, state), token_B

  (logits_BxV, _), tokens_NxB = jax.lax.scan(body, (logits_BxV, state), jnp.arange(max_new_tokens - 1))
  last_B = _choose(logits_BxV, jax.random.fold_in(key, max_new_tokens - 1), temperature, top_k, top_p)
  return jnp.concatenate([tokens_NxB.T, last_B[:, None]], axis=1)


_STATIC = ('model', 'max_new_tokens', 'temperature', 'top_k', 'top_p')
DECODE_BUCKET = 64  # the decode cache holds prompt + new tokens rounded up to a multiple of this


def cache_length(prompt_len: int, max_new_tokens: int, max_len: int) -> int:
  """Positions the decode cache needs: prompt + new tokens rounded up to DECODE_BUCKET, at most max_len."""
  return min(max_len, -(-(prompt_len + max_new_tokens) // DECODE_BUCKET) * DECODE_BUCKET)


def _with_config(model, **changes):
  cfg = model.cfg.as_configdict().to_dict()  # a copy: as_configdict() hands back a shared ConfigDict
  return model.clone(cfg=ml_collections.FrozenConfigDict({**cfg, **changes}))


def _abstract_variables(model) -> dict:
  """Every collection but the cache, boxed (with logical axis names), as shapes."""
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
  return {c: tree for c, tree in boxed.items() if c != 'cache'}


def decoding_layout(model, variables):
  """(model, variables) laid out for decoding, the same weights: a scanned stack of independent layers unrolled
  (per-layer params and caches), and on CPU the plain dense kernels stored [out, in]; anything the relayout cannot
  map stays as it is.

  Unrolled: a scanned stack carries its KV cache through the layer scan, which slices and re-stacks the whole
  [L, ...] cache at every new token; unrolled, each layer's cache is updated in place. Stacks that share a block
  (model.share_layers) keep their layout, as does any stack layers.relayout_like cannot map.
  Out-major: one new token per sequence is a matmul of a few rows, which XLA:CPU runs about 2x faster with the
  kernel as the left operand (structured.matmul_out_major); on other backends the kernels stay [in, out].
  Callers that generate repeatedly relay out once (this copies the weights); generate_cached does it itself for
  a model it is given in the training layout."""
  cfg = model.cfg
  if cfg.get('scan_layers') and cfg.get('share_layers', 'none') == 'none':
    model, variables = _relaid(model, variables, scan_layers=False)
  if jax.default_backend() == 'cpu' and not layers.out_major(model.cfg):
    model, variables = _relaid(model, variables, **{layers.OUT_MAJOR: True})
  return model, variables


def _relaid(model, variables, **changes):
  """(the model with config `changes`, `variables` in its layout), or both as they are where layers.relayout_like
  cannot map them."""
  changed = _with_config(model, **changes)
  target = _abstract_variables(changed)
  relaid = (
    layers.relayout_like(variables, _abstract_variables(model), target) if set(target) == set(variables) else None
  )
  return (model, variables) if relaid is None else (changed, relaid)


@functools.partial(jax.jit, static_argnames=_STATIC)
def generate_cached(model, variables, prompt_BxP, key, *, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0):
  """With a KV cache: one prefill pass over the prompt, then one position per new token, all in one program (the
  token loop is a lax.scan; the cache is created and updated in place inside it)."""
  model, variables = decoding_layout(model, variables)
  model = _with_config(model, decode_len=cache_length(prompt_BxP.shape[1], max_new_tokens, model.cfg.max_len))
  cache = jax.eval_shape(lambda: model.init(jax.random.key(0), prompt_BxP[:, :1], decode=True))['cache']
  cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cache)
  logits, mutated = model.apply({**variables, 'cache': cache}, prompt_BxP, decode=True, mutable=['cache'])

  def tokens_to_logits(token_B, _, cache):
    logits, mutated = model.apply({**variables, 'cache': cache}, token_B[:, None], decode=True, mutable=['cache'])
    return logits[:, -1], mutated['cache']

  return sample_loop(
    tokens_to_logits,
    logits[:, -1],
    mutated['cache'],
    key,
    max_new_tokens=max_new_tokens,
    temperature=temperature,
    top_k=top_k,
    top_p=top_p,
  )


@functools.partial(jax.jit, static_argnames=_STATIC)
def generate_in_buffer(model, variables, buf_BxT, lens_B, key, *, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0):
  """Without a cache: row r's prompt is buf[r, :lens[r]]; each new token is written after it and the whole
  fixed-length buffer re-run (prompts of different lengths in one batch; the check on the cache)."""
  rows_B = jnp.arange(buf_BxT.shape[0])
  logits_BxTxV = model.apply(variables, buf_BxT)

  def tokens_to_logits(token_B, i, buf_BxT):
    buf_BxT = buf_BxT.at[rows_B, lens_B + i].set(token_B.astype(buf_BxT.dtype))
    return model.apply(variables, buf_BxT)[rows_B, lens_B + i], buf_BxT

  return sample_loop(
    tokens_to_logits,
    logits_BxTxV[rows_B, lens_B - 1],
    buf_BxT,
    key,
    max_new_tokens=max_new_tokens,
    temperature=temperature,
    top_k=top_k,
    top_p=top_p,
  )


def generate_uncached(model, variables, prompt_BxP, key, *, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0):
  b, p = prompt_BxP.shape
  buffer = jnp.zeros((b, p + max_new_tokens), jnp.int32).at[:, :p].set(prompt_BxP)
  return generate_in_buffer(
    model,
    variables,
    buffer,
    jnp.full((b,), p, jnp.int32),
    key,
    max_new_tokens=max_new_tokens,
    temperature=temperature,
    top_k=top_k,
    top_p=top_p,
  )


def generate(
  model,
  variables,
  prompt_BxP,
  key,
  *,
  max_new_tokens: int,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
) -> np.ndarray:
  """KV-cached generation of any length. Within the context it is one cached pass; past model.max_len the
  cache is refilled from the last max_len/2 tokens (a sliding window, as nanoGPT crops its context)."""
  max_len = model.cfg.max_len
  keep = max(max_len // 2, 1)
  model, variables = decoding_layout(model, variables)
  tokens_BxL = np.asarray(prompt_BxP, np.int32)
  if tokens_BxL.shape[1] >= max_len:
    tokens_BxL = tokens_BxL[:, -keep:]
  context, new, chunk = tokens_BxL, [], 0
  remaining = max_new_tokens
  while remaining > 0:
    n = min(remaining, max_len - context.shape[1])
    out = generate_cached(
      model,
      variables,
      jnp.asarray(context),
      jax.random.fold_in(key, chunk),
      max_new_tokens=n,
      temperature=temperature,
      top_k=top_k,
      top_p=top_p,
    )
    new.append(np.asarray(out))
    remaining -= n
    chunk += 1
    context = np.concatenate([context, new[-1]], axis=1)[:, -keep:]
  return np.concatenate(new, axis=1)


def sample_text(
  model,
  variables,
  tokenizer,
  prompt: str,
  *,
  max_new_tokens: int,
  temperature: float,
  top_k: int,
  top_p: float,
  seed: int,
  num_samples: int = 1,
) -> list[str]:
  ids = np.asarray(tokenizer.encode(prompt), np.int32)
  check_request(len(ids), max_new_tokens, temperature, top_k, top_p)
  out = generate(
    model,
    variables,
    np.tile(ids[None], (num_samples, 1)),
    jax.random.key(seed),
    max_new_tokens=max_new_tokens,
    temperature=float(temperature),
    top_k=int(top_k),
    top_p=float(top_p),
  )
  return [tokenizer.decode(row) for row in out]
