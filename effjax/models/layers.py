"""Layers shared by every family: norms, causal attention with a KV cache, MLP, Block, embeddings, and the
one `LayerStack` that owns "apply this block L times" (scanned or unrolled; independent, shared or grouped).

Shapes are in names: B batch, T query length, S key length, D width, N heads, K head dim, F MLP hidden, V vocab.
Every parameter is created with logical axis names; `config.mesh.rules` decides the layout.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from effjax.models import structured

Config = Any  # an ml_collections.FrozenConfigDict (hashable, so modules stay hashable)

INIT_STD = 0.02
REMAT_POLICIES = {
  'full': None,  # save nothing, recompute the whole block
  'dots_saveable': jax.checkpoint_policies.dots_saveable,
  'dots_with_no_batch_dims_saveable': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def dtype_of(name: str):
  return jnp.dtype(name)


def normal_init(std: float, axes: tuple):
  return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


def make_norm(cfg: Config, name: str) -> nn.Module:
  """LayerNorm or RMSNorm over the last axis; statistics in f32 whatever the compute dtype."""
  scale_init = nn.with_logical_partitioning(nn.initializers.ones_init(), ('embed',))
  common = dict(
    epsilon=1e-5, dtype=jnp.float32, param_dtype=dtype_of(cfg.param_dtype), name=name, scale_init=scale_init
  )
  if cfg.norm == 'rmsnorm':
    return nn.RMSNorm(**common)
  bias_init = nn.with_logical_partitioning(nn.initializers.zeros_init(), ('embed',))
  return nn.LayerNorm(use_bias=cfg.use_bias, bias_init=bias_init, **common)


def rotary(x_BxTxNxK: jax.Array, positions_T: jax.Array, base: float) -> jax.Array:
  """Rotary position embedding (GPT-NeoX half-split layout), computed in f32."""
  k = x_BxTxNxK.shape[-1]
  inv_freq_H = 1.0 / (base ** (jnp.arange(0, k, 2, dtype=jnp.float32) / k))
  angles_TxH = positions_T.astype(jnp.float32)[:, None] * inv_freq_H[None, :]
  sin_Tx1xH, cos_Tx1xH = jnp.sin(angles_TxH)[:, None, :], jnp.cos(angles_TxH)[:, None, :]
  x1, x2 = jnp.split(x_BxTxNxK.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos_Tx1xH - x2 * sin_Tx1xH, x2 * cos_Tx1xH + x1 * sin_Tx1xH], axis=-1)
  return out.astype(x_BxTxNxK.dtype)


class Attention(nn.Module):
  """Causal multi-head self-attention. In decode mode keys/values go to a 'cache' of `decode_len(cfg)` positions
  and queries at `positions_T` attend to every cached position up to their own."""

  cfg: Config
  d_model: int
  num_heads: int
  num_layers: int = 1
  train: bool = False
  decode: bool = False

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, positions_T: jax.Array) -> jax.Array:
    cfg = self.cfg
    n, d = self.num_heads, self.d_model
    k = d // n
    b, t, _ = x_BxTxD.shape
    dense = make_dense(cfg, cfg.attn_kind)
    q_BxTxNxK, k_BxTxNxK, v_BxTxNxK = (
      dense(features=d, kernel_axes=('embed', 'heads'), name=name)(x_BxTxD).reshape(b, t, n, k)
      for name in ('query', 'key', 'value')
    )
    if cfg.pos_emb == 'rotary':
      q_BxTxNxK = rotary(q_BxTxNxK, positions_T, cfg.rope_base)
      k_BxTxNxK = rotary(k_BxTxNxK, positions_T, cfg.rope_base)

    use_dropout = self.train and cfg.attn_dropout > 0
    if self.decode:
      out_BxTxNxK = self._attend_cached(q_BxTxNxK, *self._update_cache(k_BxTxNxK, v_BxTxNxK, positions_T))
    elif not use_dropout:
      impl = cfg.attention_impl if cfg.attention_impl != 'xla' else None
      out_BxTxNxK = jax.nn.dot_product_attention(q_BxTxNxK, k_BxTxNxK, v_BxTxNxK, is_causal=True, implementation=impl)
    else:
      out_BxTxNxK = self._attend(q_BxTxNxK, k_BxTxNxK, v_BxTxNxK, jnp.tril(jnp.ones((t, t), bool)), use_dropout)
    proj_std = INIT_STD / (2 * self.num_layers) ** 0.5
    return dense(
      features=d, kernel_axes=('heads', 'embed'), name='out', **structured.residual_init(cfg.attn_kind, proj_std)
    )(out_BxTxNxK.reshape(b, t, d))

  def _update_cache(self, k_BxTxNxK, v_BxTxNxK, positions_T):
    """Writes the new keys/values at positions_T; returns the whole cache and the T×S mask of what each query sees.

    Batch and heads share one axis (G = B·N), keys are kept as [G, K, S] and values as [G, S, K]: the two decode
    matmuls read them as they are, so XLA:CPU updates them in place. (As [B, S, N, K] every layer's whole cache was
    transposed at every new token; as [B, N, ...] the update was fused into a reshape and copied.)"""
    b, t, n, k = k_BxTxNxK.shape
    s, dt = decode_len(self.cfg), k_BxTxNxK.dtype
    cached_k = self.variable('cache', 'cached_key', jnp.zeros, (b * n, k, s), dt)
    cached_v = self.variable('cache', 'cached_value', jnp.zeros, (b * n, s, k), dt)
    start = positions_T[0]
    new_k_GxKxT = k_BxTxNxK.transpose(0, 2, 3, 1).reshape(b * n, k, t)
    new_v_GxTxK = v_BxTxNxK.transpose(0, 2, 1, 3).reshape(b * n, t, k)
    cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, new_k_GxKxT, (0, 0, start))
    cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, new_v_GxTxK, (0, start, 0))
    mask_TxS = jnp.arange(s)[None, :] <= positions_T[:, None]
    return cached_k.value, cached_v.value, mask_TxS

  def _attend_cached(self, q_BxTxNxK, k_GxKxS, v_GxSxK, mask_TxS):
    """Attention over the decode cache (f32 softmax); the same sums as `_attend`."""
    b, t, n, k = q_BxTxNxK.shape
    q_GxTxK = q_BxTxNxK.transpose(0, 2, 1, 3).reshape(b * n, t, k)
    logits_GxTxS = jnp.einsum('gtk,gks->gts', q_GxTxK, k_GxKxS).astype(jnp.float32) * k**-0.5
    logits_GxTxS = jnp.where(mask_TxS[None], logits_GxTxS, jnp.finfo(jnp.float32).min)
    probs_GxTxS = jax.nn.softmax(logits_GxTxS, axis=-1)
    out_GxTxK = jnp.einsum('gts,gsk->gtk', probs_GxTxS.astype(v_GxSxK.dtype), v_GxSxK)
    return out_GxTxK.reshape(b, n, t, k).transpose(0, 2, 1, 3)

  def _attend(self, q_BxTxNxK, k_BxSxNxK, v_BxSxNxK, mask_TxS, use_dropout):
    """Plain attention (f32 softmax) for attention dropout."""
    scale = q_BxTxNxK.shape[-1] ** -0.5
    logits_BxNxTxS = jnp.einsum('btnk,bsnk->bnts', q_BxTxNxK, k_BxSxNxK).astype(jnp.float32) * scale
    logits_BxNxTxS = jnp.where(mask_TxS[None, None], logits_BxNxTxS, jnp.finfo(jnp.float32).min)
    probs_BxNxTxS = jax.nn.softmax(logits_BxNxTxS, axis=-1)
    if use_dropout:
      probs_BxNxTxS = nn.Dropout(self.cfg.attn_dropout)(probs_BxNxTxS, deterministic=False)
    return jnp.einsum('bnts,bsnk->btnk', probs_BxNxTxS.astype(v_BxSxNxK.dtype), v_BxSxNxK)


def decode_len(cfg: Config) -> int:
  """Positions in the decode cache: cfg.decode_len where the sampler set it (prompt + new tokens, rounded up;
  effjax/sample.py), else cfg.max_len."""
  return int(cfg.get('decode_len', 0) or cfg.max_len)


# Set by the sampler only (like decode_len): plain dense kernels stored [out, in] (structured.matmul_out_major).
OUT_MAJOR = 'kernels_out_major'


def out_major(cfg: Config) -> bool:
  return bool(cfg.get(OUT_MAJOR, False))


def make_dense(cfg: Config, kind: str):
  """The layer class of dense kind `kind` with the model's options, bias and dtypes bound (called like nn.Dense).
  Residual projections pass `**structured.residual_init(kind, std)`: smaller at start (GPT-2) where the kind
  takes an init, its own init otherwise."""
  layout = {'out_major': True} if kind == structured.PLAIN and out_major(cfg) else {}
  return functools.partial(
    structured.make_dense(kind, **structured.kind_options(kind, cfg)),
    use_bias=cfg.use_bias,
    dtype=dtype_of(cfg.dtype),
    param_dtype=dtype_of(cfg.param_dtype),
    **layout,
  )


class Mlp(nn.Module):
  """Two-layer GELU MLP; either Dense can be a structured layer (config.model.mlp_kind)."""

  cfg: Config
  d_model: int
  hidden: int
  num_layers: int = 1
  train: bool = False

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    cfg = self.cfg
    dense = make_dense(cfg, cfg.mlp_kind)
    h_BxTxF = nn.gelu(dense(features=self.hidden, kernel_axes=('embed', 'mlp'), name='fc')(x_BxTxD))
    h_BxTxF = nn.Dropout(cfg.dropout)(h_BxTxF, deterministic=not self.train)
    proj_std = INIT_STD / (2 * self.num_layers) ** 0.5
    return dense(
      features=self.d_model,
      kernel_axes=('mlp', 'embed'),
      name='proj',
      **structured.residual_init(cfg.mlp_kind, proj_std),
    )(h_BxTxF)


class Block(nn.Module):
  """Transformer block, pre-LN (x + f(LN(x))) or post-LN (LN(x + f(x))) by config.model.norm_position.

  `carry_output=True` returns (x, None) so the block can be the body of `nn.scan`.
  """

  cfg: Config
  d_model: int
  num_heads: int
  num_layers: int = 1
  train: bool = False
  decode: bool = False
  carry_output: bool = False

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, positions_T: jax.Array):
    cfg = self.cfg
    attn = Attention(cfg, self.d_model, self.num_heads, self.num_layers, self.train, self.decode, name='attn')
    mlp = Mlp(cfg, self.d_model, cfg.mlp_ratio * self.d_model, self.num_layers, self.train, name='mlp')
    drop = functools.partial(nn.Dropout(cfg.dropout), deterministic=not self.train)
    ln1, ln2 = make_norm(cfg, 'ln1'), make_norm(cfg, 'ln2')
    x_BxTxD = x_BxTxD
    if cfg.norm_position == 'pre':
      x_BxTxD = x_BxTxD + drop(attn(ln1(x_BxTxD).astype(x_BxTxD.dtype), positions_T))
      x_BxTxD = x_BxTxD + drop(mlp(ln2(x_BxTxD).astype(x_BxTxD.dtype)))
    else:
      x_BxTxD = ln1(x_BxTxD + drop(attn(x_BxTxD, positions_T))).astype(x_BxTxD.dtype)
      x_BxTxD = ln2(x_BxTxD + drop(mlp(x_BxTxD))).astype(x_BxTxD.dtype)
    return (x_BxTxD, None) if self.carry_output else x_BxTxD


# Model keys that shape the parameters of these layers in every family (checkpoint compatibility compares them;
# `dropout`, `remat`, `dtype` ... only change how a computation runs and are not among them).
PARAM_KEYS = (
  'num_layers',
  'd_model',
  'num_heads',
  'vocab_size',
  'max_len',
  'mlp_ratio',
  'pos_emb',
  'rope_base',
  'use_bias',
  'norm',
  'norm_position',
  'final_norm',
  'tie_embeddings',
  'head_bias',
  'param_dtype',
  'scan_layers',
  'share_layers',
  'embed_dim',
  'mlp_kind',
  'attn_kind',
)


def param_keys(cfg: Config) -> tuple[str, ...]:
  """PARAM_KEYS, num_groups when blocks are grouped, and the keys of the dense kinds in use ('dense.num_blocks')."""
  keys = list(PARAM_KEYS) + (['num_groups'] if cfg.get('share_layers') == 'groups' else [])
  for kind in dict.fromkeys((cfg.mlp_kind, cfg.attn_kind)):
    keys += structured.config_keys(kind)
  return tuple(keys)


# Collections that live per layer. 'frozen' holds doped layers' fixed weights, 'constants' fixed permutations.
PER_LAYER_COLLECTIONS = ('params', 'frozen', 'constants', 'cache')


def _scan(block_cls, length: int, share: bool, unroll: int = 1):
  """nn.scan over a block: stacked params (axis 0, logical name 'layers') or one broadcast set (shared).

  `unroll` iterations run per loop step (lax.scan's unroll; >= length: no loop at all). Same params, same
  values; only the compiled program changes.
  """
  if share:
    return nn.scan(
      block_cls,
      variable_axes={'cache': 0},
      variable_broadcast=['params', 'frozen', 'constants'],
      split_rngs={'params': False, 'dropout': True},
      in_axes=nn.broadcast,
      length=length,
      unroll=unroll,
    )
  return nn.scan(
    block_cls,
    variable_axes={c: 0 for c in PER_LAYER_COLLECTIONS},
    split_rngs={'params': True, 'dropout': True},
    in_axes=nn.broadcast,
    length=length,
    metadata_params={nn.PARTITION_NAME: 'layers'},
    unroll=unroll,
  )


AUTO_UNROLL_MAX_LAYERS = 16  # deeper stacks stay rolled: unrolled compile time grows with depth


def scan_unroll(block_kwargs, length: int) -> int:
  """config.model.scan_unroll (read from the block's cfg; absent = -1): layers per scan iteration; 0 or >= length
  unrolls the whole scan; -1 (the default) chooses by backend and depth.

  On XLA:CPU a rolled layer loop costs 10-20% of a 6-layer training step (the stacked residuals are zero-filled
  and copied through dynamic-update-slices every step; experiments/bench.py): unrolling inside the scan keeps
  the scanned parameter layout and checkpoints and runs as fast as scan_layers=False, at the price of a compile
  time that grows with the number of layers. So -1 unrolls on CPU up to AUTO_UNROLL_MAX_LAYERS and keeps the
  rolled loop on GPU/TPU, where it is not slower and compiles in constant time.
  """
  cfg = dict(block_kwargs).get('cfg')
  unroll = int(cfg.get('scan_unroll', -1)) if cfg is not None and hasattr(cfg, 'get') else -1
  if unroll < 0:
    unroll = 0 if jax.default_backend() == 'cpu' and length <= AUTO_UNROLL_MAX_LAYERS else 1
  return length if unroll == 0 or unroll >= length else unroll


class _SharedRun(nn.Module):
  """One block applied `repeats` times with the same params: the body of a grouped (G-block) stack."""

  block_cls: Any
  block_kwargs: Any
  repeats: int
  carry_output: bool = True

  @nn.compact
  def __call__(self, x, positions_T):
    x = _scan(self.block_cls, self.repeats, share=True)(**self.block_kwargs, carry_output=True, name='shared')(
      x, positions_T
    )[0]
    return (x, None) if self.carry_output else x


class LayerStack(nn.Module):
  """The one place that owns stacking: `num_layers` applications of `block_cls(**block_kwargs)`.

  share='none'   L independent blocks (params stacked on a leading 'layers' axis when scanned)
  share='all'    one block applied L times (params broadcast through the scan; count independent of L)
  share='groups' G blocks, each applied L/G consecutive times
  scan=False unrolls the same computation in Python (identical outputs from the same weights, slower compile).
  """

  block_cls: Any
  block_kwargs: Any
  num_layers: int
  scan: bool = True
  share: str = 'none'
  num_groups: int = 1
  remat: str = 'none'

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, positions_T: jax.Array) -> jax.Array:
    kwargs = dict(self.block_kwargs)
    block_cls = self._maybe_remat(self.block_cls)
    groups = {'none': self.num_layers, 'all': 1, 'groups': self.num_groups}[self.share]
    repeats = self.num_layers // groups
    if self.scan:
      if self.share == 'none':
        unroll = scan_unroll(kwargs, self.num_layers)
        return _scan(block_cls, self.num_layers, share=False, unroll=unroll)(
          **kwargs, carry_output=True, name='layers'
        )(x_BxTxD, positions_T)[0]
      if self.share == 'all':
        unroll = scan_unroll(kwargs, self.num_layers)
        return _scan(block_cls, self.num_layers, share=True, unroll=unroll)(**kwargs, carry_output=True, name='shared')(
          x_BxTxD, positions_T
        )[0]
      return _scan(_SharedRun, groups, share=False, unroll=scan_unroll(kwargs, groups))(
        block_cls, kwargs, repeats, name='groups'
      )(x_BxTxD, positions_T)[0]
    prefix = {'none': 'layer', 'all': 'shared', 'groups': 'group'}[self.share]
    for g in range(groups):
      block = block_cls(**kwargs, name=f'{prefix}_{g}' if self.share != 'all' else 'shared')
      for _ in range(repeats):
        x_BxTxD = block(x_BxTxD, positions_T)
    return x_BxTxD

  def _maybe_remat(self, block_cls):
    if self.remat == 'none':
      return block_cls
    return nn.remat(block_cls, policy=REMAT_POLICIES[self.remat], prevent_cse=not self.scan)


def unstack_layers(params: dict) -> dict:
  """A scanned LayerStack's variables in the unrolled (scan_layers=False) layout, same weights:
  stack/layers/X[L,...] -> stack/layer_i/X; stack/groups/shared/X[G,...] -> stack/group_g/X; stack/shared as is.

  Takes a model's variable tree (one with a 'stack' entry) or a LayerStack's own; any collection works.
  """
  if 'stack' in params:
    return {**params, 'stack': unstack_layers(params['stack'])}
  if 'layers' in params:
    stacked, prefix = params['layers'], 'layer'
  elif 'groups' in params:
    stacked, prefix = params['groups']['shared'], 'group'
  else:
    return dict(params)
  n = jax.tree.leaves(stacked)[0].shape[0]
  return {f'{prefix}_{i}': jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n)}


def stack_layers(params: dict) -> dict:
  """The inverse of `unstack_layers`: unrolled layer_i / group_g entries -> the scanned layout."""
  if 'stack' in params:
    return {**params, 'stack': stack_layers(params['stack'])}
  for prefix in ('layer', 'group'):
    names = sorted(
      (k for k in params if k.startswith(f'{prefix}_') and k[len(prefix) + 1 :].isdigit()),
      key=lambda k: int(k[len(prefix) + 1 :]),
    )
    if names:
      stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *(params[k] for k in names))
      return {'layers': stacked} if prefix == 'layer' else {'groups': {'shared': stacked}}
  return dict(params)


@functools.partial(jax.jit, static_argnums=2)
def _take_layer(x, i, axis: int):
  """x[..., i, ...] on `axis`; the index is traced, so one compile per shape serves every layer."""
  return jax.lax.dynamic_index_in_dim(x, i, axis, keepdims=False)


def relayout_like(variables: dict, source: dict, target: dict) -> dict | None:
  """`variables` (laid out as the boxed abstract tree `source`) in the layout of the boxed abstract tree `target`,
  the same model with another layout, or None where some leaf cannot be mapped. Any family works:
  - unstacking (target has scan_layers=False): a leaf at .../layer_i/... of `target` is index i of
    .../layers/... of `source`, taken on the axis its metadata names 'layers' (so a stack inside a vmap, whose
    leading axis is another, is read right);
  - permuted axes (an out-major kernel: ('embed', 'mlp') -> ('mlp', 'embed')): the axis names say which
    permutation. Leaves with the same names are as they are."""
  flat_source = flax.traverse_util.flatten_dict(source)
  flat_vars = flax.traverse_util.flatten_dict(variables)
  out = {}
  for path, want in flax.traverse_util.flatten_dict(target).items():
    layer = [(j, int(k[6:])) for j, k in enumerate(path) if k.startswith('layer_') and k[6:].isdigit()]
    if path in flat_source:  # the same leaf in both layouts (a stack already unrolled, or none)
      layer = []
    if len(layer) > 1:
      return None
    source_path = path[: layer[0][0]] + ('layers',) + path[layer[0][0] + 1 :] if layer else path
    if source_path not in flat_vars or source_path not in flat_source:
      return None
    value, names = flat_vars[source_path], getattr(flat_source[source_path], 'names', None)
    if layer:
      if not names or 'layers' not in names:
        return None
      axis = names.index('layers')
      value, names = _take_layer(value, layer[0][1], axis), names[:axis] + names[axis + 1 :]
    want_names = getattr(want, 'names', None)
    if names != want_names:
      unique = names and len(set(names)) == len(names)
      if not unique or len(want_names or ()) != len(names) or set(want_names) != set(names):
        return None
      value = jnp.transpose(value, [names.index(n) for n in want_names])
    if tuple(value.shape) != tuple(nn.unbox(want).shape):
      return None
    out[path] = value
  return flax.traverse_util.unflatten_dict(out)


class Embedder(nn.Module):
  """Token (+ learned position) embedding, optionally factorized: a V×E table then an E×D projection.

  `attend` maps hidden states back to vocabulary logits through the same (tied) table: h·Pᵀ·Wᵀ.
  """

  cfg: Config
  d_model: int

  def setup(self):
    cfg = self.cfg
    pdt = dtype_of(cfg.param_dtype)
    # A factorized table is V×E: its second axis is the factor width E, not the model width.
    width, table_axes = (cfg.embed_dim, ('vocab', 'factor')) if cfg.embed_dim else (self.d_model, ('vocab', 'embed'))
    self.embedding = self.param('embedding', normal_init(INIT_STD, table_axes), (cfg.vocab_size, width), pdt)
    if cfg.embed_dim:
      # std 1/sqrt(E): the product W·P (and the tied logits h·Pᵀ·Wᵀ) start at the scale of an unfactorized table.
      self.projection = self.param(
        'projection', normal_init(cfg.embed_dim**-0.5, ('factor', 'embed')), (cfg.embed_dim, self.d_model), pdt
      )
    if cfg.pos_emb == 'learned':
      self.pos_embedding = self.param(
        'pos_embedding', normal_init(INIT_STD / 2, (None, 'embed')), (cfg.max_len, self.d_model), pdt
      )

  def __call__(self, tokens_BxT: jax.Array, positions_T: jax.Array) -> jax.Array:
    dt = dtype_of(self.cfg.dtype)
    x_BxTxD = jnp.take(self.embedding, tokens_BxT, axis=0).astype(dt)
    if self.cfg.embed_dim:
      x_BxTxD = x_BxTxD @ self.projection.astype(dt)
    if self.cfg.pos_emb == 'learned':
      x_BxTxD = x_BxTxD + jnp.take(self.pos_embedding, positions_T, axis=0).astype(dt)[None]
    return x_BxTxD

  def attend(self, x_BxTxD: jax.Array) -> jax.Array:
    dt = dtype_of(self.cfg.dtype)
    if self.cfg.embed_dim:
      x_BxTxD = x_BxTxD.astype(dt) @ self.projection.astype(dt).T
    if out_major(self.cfg):  # decoding on CPU: the V×D table is already [out, in]
      return structured.matmul_out_major(x_BxTxD.astype(dt), self.embedding.astype(dt))
    # contracting both last axes (not `x @ table.T`): XLA:CPU then reads the V×D table as stored instead of
    # materialising its transpose (inside a decode loop, once per new token)
    return jnp.einsum('btd,vd->btv', x_BxTxD.astype(dt), self.embedding.astype(dt))


class OutputHead(nn.Module):
  """Final projection to the vocabulary: tied to the embedding table or its own Dense (optional bias)."""

  cfg: Config

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, embedder: Embedder | None) -> jax.Array:
    cfg = self.cfg
    if cfg.tie_embeddings and embedder is not None:
      logits = embedder.attend(x_BxTxD)
    else:
      logits = structured.Dense(
        cfg.vocab_size,
        use_bias=cfg.head_bias,
        dtype=dtype_of(cfg.dtype),
        param_dtype=dtype_of(cfg.param_dtype),
        kernel_axes=('embed', 'vocab'),
        kernel_init=nn.initializers.normal(INIT_STD),
        out_major=out_major(cfg),
        name='head',
      )(x_BxTxD)
    return logits.astype(jnp.float32)


class LanguageModel(nn.Module):
  """The one LM skeleton: embed -> dropout -> trunk -> final norm -> head. A family subclasses it and writes its
  `trunk` (the blocks between embedding and final norm), plus `embed_width` / `head_ties` where they differ.
  Submodules the trunk creates live at the top level of the params (e.g. 'stack'), next to 'embed' and 'head'."""

  cfg: Config

  def embed_width(self) -> int:
    return self.cfg.d_model

  def head_ties(self) -> bool:
    """Whether the head may read the embedding table (it does when model.tie_embeddings): widths must match."""
    return True

  def trunk(self, x_BxTxE: jax.Array, positions_T: jax.Array, train: bool, decode: bool) -> jax.Array:
    raise NotImplementedError

  @nn.compact
  def __call__(self, tokens_BxT: jax.Array, train: bool = False, decode: bool = False) -> jax.Array:
    cfg = self.cfg
    positions_T = decode_positions(self, tokens_BxT.shape[1], decode)
    embedder = Embedder(cfg, self.embed_width(), name='embed')
    x_BxTxE = nn.Dropout(cfg.dropout)(embedder(tokens_BxT, positions_T), deterministic=not train)
    y_BxTxD = self.trunk(x_BxTxE, positions_T, train, decode)
    if cfg.final_norm:
      y_BxTxD = make_norm(cfg, 'ln_f')(y_BxTxD)
    return OutputHead(cfg, name='head')(y_BxTxD, embedder if self.head_ties() else None)


def decode_positions(module: nn.Module, length: int, decode: bool) -> jax.Array:
  """Positions of the current tokens: 0..T-1, or continuing from the cache's write index when decoding."""
  if not decode:
    return jnp.arange(length, dtype=jnp.int32)
  index = module.variable('cache', 'index', lambda: jnp.zeros((), jnp.int32))
  positions_T = index.value + jnp.arange(length, dtype=jnp.int32)
  if not module.is_initializing():
    index.value = index.value + length
  return positions_T


# ----------------------------------------------------------------------------------------------------------
# Forward FLOPs per token (multiply-add = 2 FLOPs), used by accounting and MFU. Attention over the full
# context (4·S·D per block: QKᵀ and AV), as in PaLM's MFU convention.


def block_forward_flops(cfg: Config, d_model: int, seq_len: int) -> int:
  attn_opts, mlp_opts = (structured.kind_options(k, cfg) for k in (cfg.attn_kind, cfg.mlp_kind))
  attn = 4 * structured.dense_flops(cfg.attn_kind, d_model, d_model, **attn_opts)
  hidden = cfg.mlp_ratio * d_model
  mlp = structured.dense_flops(cfg.mlp_kind, d_model, hidden, **mlp_opts) + structured.dense_flops(
    cfg.mlp_kind, hidden, d_model, **mlp_opts
  )
  return attn + 4 * seq_len * d_model + mlp


def embed_forward_flops(cfg: Config, d_model: int) -> int:
  """Input projection of a factorized embedding plus the output head."""
  e, v = cfg.embed_dim, cfg.vocab_size
  inp = 2 * e * d_model if e else 0
  if cfg.tie_embeddings:
    out = 2 * d_model * e + 2 * e * v if e else 2 * d_model * v
  else:
    out = 2 * d_model * v
  return inp + out
