"""lc-gpt and cc-gpt (LinearlyCompressedGPT / ConvCompressedGPT, arXiv 2404.14462): the width shrinks as depth
grows. After every n = config.model.compress.compress_every blocks a compressor maps the width d_m to d_m / f
(f = config.model.compress.compress_factor), so with L blocks the segments run at d_0, d_0/f, ... and the head
reads d_0 / f^⌊L/n⌋ (the paper: 384 → 192 → 96 with L=4, n=2, f=2).

  lcgpt   the compressor is a Linear(d_m, d_m/f) (with bias when model.use_bias).
  ccgpt   the compressor is a Conv1d over time, kernel config.model.compress.conv_kernel (1 in the paper, which is
          the same map as the Linear), left-padded by kernel-1 so position t only sees t-k+1..t; when decoding it
          keeps the last kernel-1 inputs in the 'cache' collection.

Each constant-width segment is one `layers.LayerStack` (params/stack_{m}/...), compressors are
params/compress_{m}/..., so scanning, sharing and remat work per segment as in every other family.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from effjax import models
from effjax.errors import EffjaxError
from effjax.models import layers, validate


def segments(cfg) -> list[tuple[int, int]]:
  """(width, blocks) of each constant-width segment, in order."""
  n, out, width, left = cfg.compress.compress_every, [], cfg.d_model, cfg.num_layers
  while left > 0:
    blocks = min(n, left)
    out.append((width, blocks))
    left -= blocks
    if blocks == n:
      width //= cfg.compress.compress_factor
  return out


def compressions(cfg) -> list[tuple[int, int]]:
  """(in width, out width) of each compressor: one after every full segment of compress_every blocks."""
  f, n = cfg.compress.compress_factor, cfg.compress.compress_every
  return [(w, w // f) for w, blocks in segments(cfg) if blocks == n]


def final_width(cfg) -> int:
  return cfg.d_model // cfg.compress.compress_factor ** (cfg.num_layers // cfg.compress.compress_every)


class CausalConv1d(nn.Module):
  """Conv1d over time (channels last) that never sees the future: kernel-1 zeros on the left of the sequence,
  or, when decoding, the kernel-1 previous inputs kept in the cache."""

  cfg: layers.Config
  features: int
  kernel: int
  decode: bool = False

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    cfg, k = self.cfg, self.kernel
    b, _, d = x_BxTxD.shape
    if k > 1:
      if self.decode:
        state = self.variable('cache', 'conv_state', jnp.zeros, (b, k - 1, d), x_BxTxD.dtype)
        x_BxSxD = jnp.concatenate([state.value, x_BxTxD], axis=1)
        if not self.is_initializing():
          state.value = x_BxSxD[:, -(k - 1) :]
      else:
        x_BxSxD = jnp.pad(x_BxTxD, ((0, 0), (k - 1, 0), (0, 0)))
    else:
      x_BxSxD = x_BxTxD
    return nn.Conv(
      self.features,
      kernel_size=(k,),
      padding='VALID',
      use_bias=cfg.use_bias,
      dtype=layers.dtype_of(cfg.dtype),
      param_dtype=layers.dtype_of(cfg.param_dtype),
      kernel_init=layers.normal_init(layers.INIT_STD, (None, 'embed', None)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,)),
      name='conv',
    )(x_BxSxD)


class CompressedGPT(layers.LanguageModel):
  """Shared body of lc-gpt and cc-gpt (subclasses choose the compressor). The trunk: segments of compress_every
  blocks, each followed by a compressor dividing the width by compress_factor."""

  def compressor(self, out_width: int, decode: bool, name: str) -> nn.Module:
    raise NotImplementedError

  def head_ties(self) -> bool:
    return final_width(self.cfg) == self.cfg.d_model

  def trunk(self, x_BxTxD: jax.Array, positions_T: jax.Array, train: bool, decode: bool) -> jax.Array:
    cfg = self.cfg
    m = 0
    for i, (width, blocks) in enumerate(segments(cfg)):
      x_BxTxD = layers.LayerStack(
        block_cls=layers.Block,
        block_kwargs=dict(
          cfg=cfg, d_model=width, num_heads=cfg.num_heads, num_layers=cfg.num_layers, train=train, decode=decode
        ),
        num_layers=blocks,
        scan=cfg.scan_layers,
        share=cfg.share_layers,
        num_groups=cfg.num_groups,
        remat=cfg.remat,
        name=f'stack_{i}',
      )(x_BxTxD, positions_T)
      if blocks == cfg.compress.compress_every:  # d_{m+1} = d_m / f
        x_BxTxD = self.compressor(width // cfg.compress.compress_factor, decode, f'compress_{m}')(x_BxTxD)
        m += 1
    return x_BxTxD

  @staticmethod
  def param_keys(cfg) -> tuple[str, ...]:
    return layers.param_keys(cfg) + ('compress.compress_every', 'compress.compress_factor')

  @staticmethod
  def compressor_flops(cfg, d_in: int, d_out: int) -> int:
    return 2 * d_in * d_out

  @classmethod
  def _flops(cls, cfg, seq_len: int) -> int:
    blocks = sum(n * layers.block_forward_flops(cfg, w, seq_len) for w, n in segments(cfg))
    comp = sum(cls.compressor_flops(cfg, a, b) for a, b in compressions(cfg))
    factor_in = 2 * cfg.embed_dim * cfg.d_model if cfg.embed_dim else 0
    return int(blocks + comp + factor_in + 2 * final_width(cfg) * cfg.vocab_size)

  @staticmethod
  def summary_extras(cfg, abstract_variables) -> dict:
    params = abstract_variables.get('params', {})
    count = lambda tree: int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))
    segs = segments(cfg)
    return {
      'widths': [w for w, _ in segs] + ([final_width(cfg)] if final_width(cfg) != segs[-1][0] else []),
      'blocks_per_width': [n for _, n in segs],
      'segment_params': [count(params.get(f'stack_{i}', {})) for i in range(len(segs))],
      'compressor_params': [count(params.get(f'compress_{m}', {})) for m in range(len(compressions(cfg)))],
      'head_width': final_width(cfg),
    }


class LinearlyCompressedGPT(CompressedGPT):
  def compressor(self, out_width, decode, name):
    cfg = self.cfg
    return nn.Dense(
      out_width,
      use_bias=cfg.use_bias,
      dtype=layers.dtype_of(cfg.dtype),
      param_dtype=layers.dtype_of(cfg.param_dtype),
      kernel_init=layers.normal_init(layers.INIT_STD, ('embed', None)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,)),
      name=name,
    )

  @classmethod
  def forward_flops_per_token(cls, cfg, seq_len: int) -> int:
    return cls._flops(cfg, seq_len)


class ConvCompressedGPT(CompressedGPT):
  def compressor(self, out_width, decode, name):
    return CausalConv1d(self.cfg, out_width, self.cfg.compress.conv_kernel, decode, name=name)

  @staticmethod
  def param_keys(cfg) -> tuple[str, ...]:
    return CompressedGPT.param_keys(cfg) + ('compress.conv_kernel',)

  @staticmethod
  def compressor_flops(cfg, d_in: int, d_out: int) -> int:
    return 2 * cfg.compress.conv_kernel * d_in * d_out

  @classmethod
  def forward_flops_per_token(cls, cfg, seq_len: int) -> int:
    return cls._flops(cfg, seq_len)


def check(m) -> None:
  """lc-gpt / cc-gpt config checks: every width the compressions reach must suit the heads (and rotary)."""
  for key in ('compress_every', 'compress_factor', 'conv_kernel'):
    validate.check_positive(m, f'compress.{key}')
  own = m.compress
  f = own.compress_factor
  if f < 2:
    raise EffjaxError(
      f'model.compress.compress_factor={f} is invalid; it must be >= 2 (each compression divides the width by it)'
    )
  width, left, n = m.d_model, m.num_layers, own.compress_every
  while left > 0:
    blocks = min(n, left)
    if width % m.num_heads:
      raise EffjaxError(
        f'model.num_heads={m.num_heads} does not divide the compressed width {width} '
        f'(d_model={m.d_model} / compress_factor={f} per {n} blocks); choose '
        'heads, d_model or compress_factor so every width is a multiple of the heads'
      )
    if m.pos_emb == 'rotary' and (width // m.num_heads) % 2:
      raise EffjaxError(f'rotary positions need an even head dim at every width, got {width}/{m.num_heads}')
    if m.share_layers == 'groups' and blocks % m.num_groups:
      raise EffjaxError(f'model.num_groups={m.num_groups} does not divide the {blocks} blocks at width {width}')
    left -= blocks
    if blocks == n:
      if width % f:
        raise EffjaxError(
          f'model.compress.compress_factor={f} does not divide the width {width} reached '
          f'after {m.num_layers - left} blocks (d_model={m.d_model}); use a d_model divisible by '
          f'compress_factor^{m.num_layers // n}'
        )
      width //= f
  if m.tie_embeddings and width != m.d_model:
    raise EffjaxError(
      f'model.tie_embeddings=True does not fit {m.family}: the head reads width {width}, the '
      f'embedding is d_model={m.d_model} wide; use tie_embeddings=False'
    )


def memory_blocks(cfg) -> list[tuple[str, int, int, int]]:
  """Each segment's blocks at its own width."""
  return [('block', w, cfg.num_heads, n) for w, n in segments(cfg)]


for _name, _cls in (('lcgpt', LinearlyCompressedGPT), ('ccgpt', ConvCompressedGPT)):
  models.register_family(
    models.Family(
      _name,
      _cls,
      forward_flops=_cls.forward_flops_per_token,
      check=check,
      param_keys=_cls.param_keys,
      summary_extras=_cls.summary_extras,
      memory_blocks=memory_blocks,
    )
  )
