"""Low-rank factorized dense layers: W ≈ U·V with U [in, r] and V [r, out], so a d_in -> d_out map costs
r·(d_in + d_out) parameters and 2·r·(d_in + d_out) FLOPs per token instead of d_in·d_out and 2·d_in·d_out.

A dense kind (`model.mlp_kind` / `model.attn_kind` = 'lowrank', rank `model.dense.lowrank_rank`, a key that
configs/lowrank.py adds): registering it here is all the stack needs; the MLP and attention projections take it
like any other kind.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from effjax.errors import EffjaxError
from effjax.models import structured

DEFAULT_RANK = 16


class LowRankDense(nn.Module):
  """y = (x·U)·V + b. Init: U ~ N(0, 1/in) keeps x·U at the scale of x, V ~ N(0, std²·in/r) gives the product
  U·V entries of std `std` (0.02, GPT-2's dense init; residual projections pass a smaller one). The rank axis is
  small and replicated (logical name None); in/out carry the kernel's own names."""

  features: int
  rank: int = DEFAULT_RANK
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_axes: structured.Axes = ('embed', 'mlp')
  std: float = 0.02

  @nn.compact
  def __call__(self, x_BxI: jax.Array) -> jax.Array:
    d_in, r = x_BxI.shape[-1], self.rank
    u_IxR = self.param(
      'u',
      nn.with_logical_partitioning(nn.initializers.normal(d_in**-0.5), (self.kernel_axes[0], None)),
      (d_in, r),
      self.param_dtype,
    )
    v_RxO = self.param(
      'v',
      nn.with_logical_partitioning(nn.initializers.normal(self.std * (d_in / r) ** 0.5), (None, self.kernel_axes[1])),
      (r, self.features),
      self.param_dtype,
    )
    bias_O = structured.bias(self)
    x_BxI, u_IxR, v_RxO, bias_O = nn.dtypes.promote_dtype(x_BxI, u_IxR, v_RxO, bias_O, dtype=self.dtype)
    h_BxR = jnp.einsum('...i,ir->...r', x_BxI, u_IxR)
    y_BxO = jnp.einsum('...r,ro->...o', h_BxR, v_RxO)
    return y_BxO + bias_O if self.use_bias else y_BxO


def params(d_in: int, d_out: int, use_bias: bool = True, lowrank_rank: int = DEFAULT_RANK) -> int:
  return lowrank_rank * (d_in + d_out) + (d_out if use_bias else 0)


def flops(d_in: int, d_out: int, lowrank_rank: int = DEFAULT_RANK) -> int:
  return 2 * lowrank_rank * (d_in + d_out)


def check(lowrank_rank: int = DEFAULT_RANK) -> None:
  if not isinstance(lowrank_rank, int) or isinstance(lowrank_rank, bool) or lowrank_rank <= 0:
    raise EffjaxError(f'model.dense.lowrank_rank={lowrank_rank!r} is invalid; it must be a positive integer')


structured.register_kind(
  structured.DenseKind(
    'lowrank',
    build=lambda lowrank_rank=DEFAULT_RANK: functools.partial(LowRankDense, rank=lowrank_rank),
    params=params,
    flops=flops,
    config_keys=('lowrank_rank',),
    decayed=('u', 'v'),
    residual_init=lambda std: {'std': std},
    check=check,
  )
)
