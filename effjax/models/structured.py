"""Structured replacements for dense layers (seed 004, §4): Adaptive FastFood and block-diagonal + block-Hadamard,
and the table of dense kinds every model layer is built from.

All layers share `nn.Dense`'s call signature (features, use_bias, dtype, param_dtype, plus `kernel_axes`, the
logical names a dense kernel's (in, out) dims would have), so `make_dense(kind)` can swap them into a model.
A kind is one `DenseKind` entry (`register_kind`): its constructor, parameter and FLOP counts, the keys of the
`model.dense` config section it reads and the leaves weight decay applies to. A module of effjax/models registers
its own kinds; nothing else lists them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import zlib
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from effjax.errors import EffjaxError

Axes = tuple[str | None, str | None]


# --------------------------------------------------------------------------------------------------- FWHT
def _hadamard_np(n: int) -> np.ndarray:
  """Sylvester Hadamard matrix (same order as scipy.linalg.hadamard)."""
  h = np.ones((1, 1), np.float32)
  while h.shape[0] < n:
    h = np.block([[h, h], [h, -h]])
  return h


def _check_pow2(n: int, what: str = 'fwht length') -> None:
  if n < 1 or n & (n - 1):
    raise ValueError(f'{what} must be a power of two, got n={n}')


def _butterfly(x_LxN: jax.Array, h: int) -> jax.Array:
  """Sylvester butterfly stages with strides h, 2h, ... < n along the last axis (n/h a power of two).

  Radix-4 stages (two radix-2 stages fused into one pass over memory) while possible, one radix-2 at the end.
  Starting at h = m these stages alone are H_{n/m} (x) I_m, the mixing across n/m contiguous blocks.
  """
  *lead, n = x_LxN.shape
  while h < n:
    r = 4 if 4 * h <= n else 2
    y = x_LxN.reshape(*lead, n // (r * h), r, h)
    p = [y[..., i, :] for i in range(r)]
    if r == 2:
      p = [p[0] + p[1], p[0] - p[1]]
    else:
      s, t, u, v = p[0] + p[1], p[0] - p[1], p[2] + p[3], p[2] - p[3]
      p = [s + u, t + v, s - u, t - v]
    x_LxN = jnp.stack(p, axis=-2).reshape(*lead, n)
    h *= r
  return x_LxN


def _hadamard_list(p: list) -> list:
  """In-place Sylvester butterfly over a Python list of equal-shape arrays: out_j = sum_i H[i, j] p_i."""
  h = 1
  while h < len(p):
    for i in range(len(p)):
      if i & h == 0:
        p[i], p[i + h] = p[i] + p[i + h], p[i] - p[i + h]
    h *= 2
  return p


_FACTOR = 16  # H_n = H_16 (x) H_16 (x) ...: one 16x16 matmul per factor (measured in experiments/bench_structured.py)


def _fwht(x: jax.Array) -> jax.Array:
  """H_n as the Kronecker product of small Hadamards, each a matmul over its own group of index bits."""
  n = x.shape[-1]
  _check_pow2(n)
  y_RxN = x.astype(jnp.promote_types(x.dtype, jnp.float32)).reshape(-1, n)  # bf16 sums accumulate in f32
  inner = n
  while inner > 1:  # contract the highest remaining bits: y viewed as [rows, f, inner / f]
    f = min(_FACTOR, inner)
    inner //= f
    h_FxF = jnp.asarray(_hadamard_np(f), y_RxN.dtype)
    if inner == 1:  # the lowest bits are contiguous: a plain [rows * n / f, f] x [f, f] matmul
      y_RxN = jnp.matmul(y_RxN.reshape(-1, f), h_FxF, precision=jax.lax.Precision.HIGHEST).reshape(-1, n)
    else:
      y_RxFxI = jnp.einsum('fg,rfi->rgi', h_FxF, y_RxN.reshape(-1, f, inner), precision=jax.lax.Precision.HIGHEST)
      y_RxN = y_RxFxI.reshape(-1, n)
  return y_RxN.reshape(x.shape).astype(x.dtype)


@jax.custom_vjp
def fwht(x: jax.Array) -> jax.Array:
  """Unnormalised Walsh–Hadamard transform over the last axis: `x @ scipy.linalg.hadamard(n)`, O(n log n).

  Sylvester's H_n = H_16 (x) H_16 (x) ... (x) H_r, so the transform is ceil(log16 n) passes over memory, each a
  16x16 matmul on one group of 4 index bits (32 FLOPs per element instead of 4 butterfly adds, but XLA:CPU runs
  a pass as one matmul kernel). In a side-by-side probe the previous layout (one 16x16 matmul, then radix-4
  butterfly passes) was 1.16x / 1.35x slower at n = 1024 / 4096, and made FastFood's fwd+bwd 1.5x slower; the
  plain radix-2 recipe is a row of experiments/bench_structured.py. The VJP is the same transform (H symmetric).
  """
  return _fwht(x)


fwht.defvjp(lambda x: (_fwht(x), None), lambda _, g: (_fwht(g),))


@jax.custom_vjp
def _permute(x_BxN: jax.Array, perm_N: jax.Array, inv_N: jax.Array) -> jax.Array:
  """x[..., perm]; the VJP gathers with the inverse permutation (XLA's scatter-add is slow on CPU)."""
  return jnp.take_along_axis(x_BxN, jnp.broadcast_to(perm_N, x_BxN.shape), axis=-1, mode='clip')


_permute.defvjp(
  lambda x, perm, inv: (_permute(x, perm, inv), (perm, inv)), lambda res, g: (_permute(g, res[1], res[0]), None, None)
)


def _next_pow2(d: int) -> int:
  return 1 << max(d - 1, 0).bit_length()


# ------------------------------------------------------------------------------------------------ layers
def bias(layer: nn.Module) -> jax.Array | None:
  """A dense-like layer's bias [features] (zeros, sharded like the output axis), or None when use_bias is off.
  Called from the layer's compact __call__, so the parameter is the layer's own 'bias'."""
  if not layer.use_bias:
    return None
  axes = nn.with_logical_partitioning(nn.initializers.zeros, (layer.kernel_axes[1],))
  return layer.param('bias', axes, (layer.features,), layer.param_dtype)


# Up to this many rows, XLA:CPU multiplies faster with the weight as the dot's left operand (see matmul_out_major).
FEW_ROWS = 64


def matmul_out_major(x_BxI: jax.Array, kernel_OxI: jax.Array) -> jax.Array:
  """x @ kernel.T for a kernel stored [out, in], as decoding keeps it (and as the tied head's table is stored).

  For a few rows (one new token per sequence) XLA:CPU's GEMM re-packs the whole [in, out] weight at every call;
  with the weight as the left operand, [out, in] @ [in, rows], it streams it as stored: at 8 rows of GPT-2's
  768 -> 3072 MLP 0.51 vs 1.07 ms, its 50257-token head 7.9 vs 14.0 ms (experiments/bench_decode.py has the whole
  effect). The barrier keeps XLA from folding the transpose of the small [out, rows] result back into the dot,
  which would restore the slow form. Past FEW_ROWS (equal at 64 and 128 rows, slower at 512) it is a plain dot."""
  rows = math.prod(x_BxI.shape[:-1])
  if rows > FEW_ROWS:
    return jnp.einsum('...i,oi->...o', x_BxI, kernel_OxI)
  y_OxR = jax.lax.optimization_barrier(jnp.einsum('oi,ri->or', kernel_OxI, x_BxI.reshape(rows, -1)))
  return y_OxR.T.reshape(*x_BxI.shape[:-1], kernel_OxI.shape[0])


class Dense(nn.Module):
  """nn.Dense with logically partitioned kernel (kernel_axes) and bias ((kernel_axes[1],)); GPT-2 init.

  `out_major` stores the kernel [out, in] (its axes names reversed) and multiplies through `matmul_out_major`: the
  layout the sampler relays a model out to for decoding on CPU (effjax/sample.py, decoding_layout)."""

  features: int
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_axes: Axes = ('embed', 'mlp')
  kernel_init: Callable = nn.initializers.normal(0.02)
  out_major: bool = False

  @nn.compact
  def __call__(self, x_BxI: jax.Array) -> jax.Array:
    shape, axes = (x_BxI.shape[-1], self.features), self.kernel_axes
    if self.out_major:
      shape, axes = shape[::-1], axes[::-1]
    kernel = self.param('kernel', nn.with_logical_partitioning(self.kernel_init, axes), shape, self.param_dtype)
    bias_O = bias(self)
    x_BxI, kernel, bias_O = nn.dtypes.promote_dtype(x_BxI, kernel, bias_O, dtype=self.dtype)
    if self.out_major:
      y_BxO = matmul_out_major(x_BxI, kernel)
    else:
      y_BxO = jnp.einsum('...i,io->...o', x_BxI, kernel)
    return y_BxO + bias_O if self.use_bias else y_BxO


def _rademacher(key, shape, dtype=jnp.float32):
  return jax.random.rademacher(key, shape, dtype)


class AdaptiveFastFood(nn.Module):
  """y = c · S H G Π H B x per block (Le et al. 2013; adaptive: S, G, B learned), O(n log n), 3n params/block.

  The input is zero-padded to n = next power of two >= in; ceil(features / n) independent blocks are stacked
  and the output truncated to `features`. Init: B = ±1, G ~ N(0, 1), S = 1 and a fixed c = 1/sqrt(n·in), so
  each output has variance ~1 for x ~ N(0, I), like a LeCun-normal Dense (H B x has variance in per entry, G and
  the second H multiply it by n). The diagonals are tiny and each block's FWHT needs the whole n, so they are
  replicated (axes None); the bias is sharded like a dense bias.

  Π is fixed: the 'constants' variable 'perm' [blocks, n] int32, drawn at init from `make_rng('params')`
  (flax folds in the module path, and nn.scan with split_rngs gives each layer its own), or, if `perm_seed` is
  set, from numpy with seed (perm_seed, crc32(module path)). Apply needs the 'constants' collection.
  On CPU the rows go through in tiles that stay in cache (_in_row_tiles).
  """

  features: int
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_axes: Axes = ('embed', 'mlp')
  perm_seed: int | None = None

  def _perm(self, k: int, n: int) -> jax.Array:
    if self.perm_seed is None:
      keys = jax.random.split(self.make_rng('params'), k)
      return jax.vmap(lambda key: jax.random.permutation(key, n))(keys).astype(jnp.int32)
    rng = np.random.default_rng([self.perm_seed, zlib.crc32('/'.join(self.scope.path).encode())])
    return jnp.asarray(np.stack([rng.permutation(n) for _ in range(k)]), jnp.int32)

  @nn.compact
  def __call__(self, x_BxI: jax.Array) -> jax.Array:
    *lead, d_in = x_BxI.shape
    n = _next_pow2(d_in)
    k = -(-self.features // n)
    diag = lambda name, init: self.param(
      name, nn.with_logical_partitioning(init, (None, None)), (k, n), self.param_dtype
    )
    b_KxN, g_KxN = diag('b', _rademacher), diag('g', nn.initializers.normal(1.0))
    s_KxN = diag('s', nn.initializers.ones)
    perm_KxN = self.variable('constants', 'perm', self._perm, k, n).value
    x_BxI, b_KxN, g_KxN, s_KxN = nn.dtypes.promote_dtype(x_BxI, b_KxN, g_KxN, s_KxN, dtype=self.dtype)

    # [B, rows, n]: B the leading axis, the one a mesh shards (data, fsdp); the tiles split the rows after it
    b = lead[0] if len(lead) > 1 else 1
    x_BxRxN = jnp.pad(x_BxI.reshape(b, -1, d_in), [(0, 0), (0, 0), (0, n - d_in)])
    scale_KxN = s_KxN / math.sqrt(n * d_in)
    inv_KxN = jnp.argsort(perm_KxN, axis=-1).astype(jnp.int32)

    def blocks(x_TxN):  # every block on these rows, one after another: [T, k * n]
      out = []
      for i in range(k):
        h_TxN = _permute(fwht(x_TxN * b_KxN[i]), perm_KxN[i], inv_KxN[i])
        out.append(fwht(h_TxN * g_KxN[i]) * scale_KxN[i])
      return jnp.concatenate(out, axis=-1)

    y_BxRxO = _in_row_tiles(blocks, x_BxRxN, max(1, TILE_ELEMENTS // n))[..., : self.features]
    y_BxO = y_BxRxO.reshape(*lead, self.features)
    bias_O = bias(self)
    return y_BxO if bias_O is None else y_BxO + bias_O.astype(y_BxO.dtype)


TILE_ELEMENTS = 128 * 1024  # a FastFood row tile: [rows, n] f32 of 512 KB, inside this machine's 1 MB L2


def _in_row_tiles(fn, x_BxRxN: jax.Array, tile_rows: int) -> jax.Array:
  """fn (rows -> rows) over x's [B * R, n] rows, on the CPU backend tile_rows rows at a time, one tile after
  another (lax.map): each tile holds the same R-range of every leading index b, so the loop runs over an axis no
  mesh shards and a B sharded over devices stays sharded (a loop over B's rows made XLA gather x on every device).

  FastFood's transforms are a dozen passes over a [rows, n] array each: over all 4096 rows of a batch every pass
  streams 16 MB through memory, over 128 rows it stays in cache. At 4096 x 1024 -> 6144, fwd+bwd, the median of
  9 interleaved calls went from 531 to 377 ms (256-row tiles: 401 ms; the blocks one after another over all rows,
  as before, 531). R is padded up to whole tiles. Other backends, and inputs of at most one tile (decoding), run
  fn on all rows at once."""
  b, rows, n = x_BxRxN.shape
  per = max(1, tile_rows // b)  # rows of each leading index in one tile
  apply = lambda x_BxPxN: fn(x_BxPxN.reshape(-1, n)).reshape(b, x_BxPxN.shape[1], -1)
  if jax.default_backend() != 'cpu' or rows <= per:
    return apply(x_BxRxN)
  tiles = -(-rows // per)
  x_BxRxN = jnp.pad(x_BxRxN, [(0, 0), (0, tiles * per - rows), (0, 0)])
  y_TxBxPxO = jax.lax.map(apply, x_BxRxN.reshape(b, tiles, per, n).swapaxes(0, 1))
  return y_TxBxPxO.swapaxes(0, 1).reshape(b, tiles * per, -1)[:, :rows]


class BlockDiagonalDense(nn.Module):
  """Block-diagonal linear map: in and out split into num_blocks contiguous blocks, kernel [nb, in/nb, out/nb].

  Params and FLOPs are 1/num_blocks of a Dense; LeCun-normal init on the block fan-in in/nb. With `mix=True` the
  output blocks are then mixed as by BlockHadamard, applied while blocks are the leading axis (on CPU, XLA fuses
  a transposed dot output into the mixing ~10x slower otherwise); `mix='expanding'` mixes only when the layer
  widens (features > in: an MLP's first matrix), which makes an MLP of two of them the seed's Figure 5.
  """

  features: int
  num_blocks: int = 4
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_axes: Axes = ('embed', 'mlp')
  kernel_init: Callable = nn.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))
  mix: bool | str = False

  @nn.compact
  def __call__(self, x_BxI: jax.Array) -> jax.Array:
    *lead, d_in = x_BxI.shape
    nb = self.num_blocks
    if d_in % nb or self.features % nb:
      raise ValueError(
        f'BlockDiagonalDense: in={d_in} and features={self.features} must be divisible by num_blocks={nb}'
      )
    kernel_KxIxO = self.param(
      'kernel',
      nn.with_logical_partitioning(self.kernel_init, (None, *self.kernel_axes)),
      (nb, d_in // nb, self.features // nb),
      self.param_dtype,
    )
    bias_O = bias(self)
    x_BxI, kernel_KxIxO, bias_O = nn.dtypes.promote_dtype(x_BxI, kernel_KxIxO, bias_O, dtype=self.dtype)
    x_KxMxI = jnp.swapaxes(x_BxI.reshape(-1, nb, d_in // nb), 0, 1)  # blocks leading: plain batched matmuls
    y_KxMxO = jnp.einsum('kmi,kio->kmo', x_KxMxI, kernel_KxIxO)
    if mixes(self.mix, d_in, self.features):  # H_nb over the (unsharded) leading block axis, as whole-slice adds
      _check_pow2(nb, 'BlockHadamard num_blocks')
      y_KxMxO = jnp.stack(_hadamard_list(list(y_KxMxO)), 0) * (1 / math.sqrt(nb))
    y_BxO = jnp.swapaxes(y_KxMxO, 0, 1).reshape(*lead, self.features)
    return y_BxO + bias_O if self.use_bias else y_BxO


BLOCKDIAG_MIX = {'each': True, 'expanding': 'expanding'}  # model.dense.blockdiag_mix -> BlockDiagonalDense.mix


def mixes(mix: bool | str, d_in: int, d_out: int) -> bool:
  """Whether a block-diagonal layer is followed by the block-Hadamard mixing (see BlockDiagonalDense.mix)."""
  return d_out > d_in if mix == 'expanding' else bool(mix)


def block_hadamard(x_BxD: jax.Array, num_blocks: int) -> jax.Array:
  """(H_nb / sqrt(nb)) (x) I_{D/nb} along the last axis: output block j = sum_i H[i, j] x_i / sqrt(nb)."""
  d = x_BxD.shape[-1]
  _check_pow2(num_blocks, 'BlockHadamard num_blocks')
  if d % num_blocks:
    raise ValueError(f'BlockHadamard: width {d} must be divisible by num_blocks={num_blocks}')
  return _butterfly(x_BxD, d // num_blocks) * (1 / math.sqrt(num_blocks))


class BlockHadamard(nn.Module):
  """Mixes num_blocks contiguous feature blocks with H_nb / sqrt(nb) (orthogonal, so scale-preserving).

  Brings the long-range correlations block-diagonal maps lack; log2(nb) adds per feature, no params unless
  `use_scale` (a learned per-feature scale, init 1).
  """

  num_blocks: int = 4
  use_scale: bool = False
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_axes: Axes = ('embed', 'mlp')

  @nn.compact
  def __call__(self, x_BxD: jax.Array) -> jax.Array:
    (x_BxD,) = nn.dtypes.promote_dtype(x_BxD, dtype=self.dtype)
    y_BxD = block_hadamard(x_BxD, self.num_blocks)
    if self.use_scale:
      scale_D = self.param(
        'scale',
        nn.with_logical_partitioning(nn.initializers.ones, (self.kernel_axes[1],)),
        (x_BxD.shape[-1],),
        self.param_dtype,
      )
      y_BxD = y_BxD * scale_D.astype(y_BxD.dtype)
    return y_BxD


def dense_matrix(module: nn.Module, variables: Any, in_features: int) -> jax.Array:
  """The explicit [in, features] matrix a (linear) layer computes: f(I) - f(0), i.e. without the bias."""
  x_2IxI = jnp.concatenate([jnp.eye(in_features), jnp.zeros((in_features, in_features))])
  y_2IxO = jax.jit(module.apply)(variables, x_2IxI)
  return y_2IxO[:in_features] - y_2IxO[in_features:]


# ---------------------------------------------------------------------------------------------- the table
@dataclasses.dataclass(frozen=True)
class DenseKind:
  """Everything the stack knows about one dense kind. `build`, `params` and `flops` take the kind's options (the
  `config_keys` of the model.dense section it reads) as keyword arguments, with their defaults in their own
  signatures."""

  name: str
  build: Callable[..., Callable[..., nn.Module]]  # (**options) -> a class called like nn.Dense
  params: Callable[..., int]  # (d_in, d_out, use_bias, **options) -> trainable parameters
  flops: Callable[..., int]  # (d_in, d_out, **options) -> forward FLOPs per token (no bias)
  config_keys: tuple[str, ...] = ()  # model.dense.<key> settings passed as options (shaping params)
  decayed: tuple[str, ...] = ()  # names of the param leaves weight decay applies to
  residual_init: Callable[[float], dict] | None = None  # std -> constructor kwargs of a residual projection
  check: Callable[..., None] | None = None  # (**options) -> None; raises EffjaxError on a bad value


_KINDS: dict[str, DenseKind] = {}
PLAIN = 'dense'  # the kind the structured ones stand in for (accounting's emulated_params)
SECTION = 'dense'  # the model config section holding the kinds' options: model.dense.num_blocks


def register_kind(kind: DenseKind) -> DenseKind:
  _KINDS[kind.name] = kind
  return kind


def kinds() -> list[str]:
  """Every registered kind, built-ins first (the modules of effjax/models register theirs on import)."""
  from effjax import models  # pylint: disable=import-outside-toplevel

  models.discover()
  return list(_KINDS)


def kind(name: str) -> DenseKind:
  if name not in _KINDS:
    kinds()
  if name not in _KINDS:
    raise ValueError(f'unknown dense kind {name!r}; valid kinds: {", ".join(_KINDS)}')
  return _KINDS[name]


def _options(entry: DenseKind, options: dict) -> dict:
  return {k: v for k, v in options.items() if k in entry.config_keys}


def kind_options(name: str, model_config) -> dict:
  """The options of kind `name` that a model config's dense section sets (absent keys keep the kind's
  defaults)."""
  options = model_config.get(SECTION) or {}
  return {k: options[k] for k in kind(name).config_keys if k in options}


def config_keys(name: str) -> tuple[str, ...]:
  """Kind `name`'s keys as dotted model-config keys ('dense.num_blocks'), as a checkpoint records them."""
  return tuple(f'{SECTION}.{k}' for k in kind(name).config_keys)


def make_dense(name: str, **options) -> Callable[..., nn.Module]:
  """Layer class for a kind, called like nn.Dense: make_dense(kind)(features=..., kernel_axes=..., name=...).
  Options the kind does not read are ignored, so a caller may pass every kind's (e.g. num_blocks)."""
  entry = kind(name)
  return entry.build(**_options(entry, options))


def dense_params(name: str, d_in: int, d_out: int, use_bias: bool = True, **options) -> int:
  """Trainable parameters that make_dense(kind) creates for a d_in -> d_out layer."""
  entry = kind(name)
  return entry.params(d_in, d_out, use_bias, **_options(entry, options))


def dense_flops(name: str, d_in: int, d_out: int, **options) -> int:
  """Algorithmic forward FLOPs per token (no bias): multiply-adds count 2, a Hadamard n·log2(n) adds."""
  entry = kind(name)
  return entry.flops(d_in, d_out, **_options(entry, options))


def residual_init(name: str, std: float) -> dict:
  """Constructor kwargs that start a residual projection at `std` (GPT-2); kinds without a hook keep their own."""
  hook = kind(name).residual_init
  return hook(std) if hook is not None else {}


def check_options(name: str, **options) -> None:
  entry = kind(name)
  if entry.check is not None:
    entry.check(**_options(entry, options))


def decayed_leaf_names() -> frozenset[str]:
  """Names of param leaves that are weight matrices of some kind (weight decay applies to them)."""
  kinds()
  return frozenset(n for entry in _KINDS.values() for n in entry.decayed)


def _fastfood_shape(d_in: int, d_out: int) -> tuple[int, int]:
  n = _next_pow2(d_in)
  return n, -(-d_out // n)


def _fastfood_params(d_in: int, d_out: int, use_bias: bool = True) -> int:
  n, k = _fastfood_shape(d_in, d_out)
  return 3 * n * k + (d_out if use_bias else 0)


def _fastfood_flops(d_in: int, d_out: int) -> int:
  n, k = _fastfood_shape(d_in, d_out)
  return k * (3 * n + 2 * n * int(math.log2(n)))


register_kind(
  DenseKind(
    'dense',
    build=lambda: Dense,
    params=lambda d_in, d_out, use_bias=True: d_in * d_out + (d_out if use_bias else 0),
    flops=lambda d_in, d_out: 2 * d_in * d_out,
    decayed=('kernel',),
    residual_init=lambda std: {'kernel_init': nn.initializers.normal(std)},
  )
)
register_kind(DenseKind('fastfood', build=lambda: AdaptiveFastFood, params=_fastfood_params, flops=_fastfood_flops))


def _blockdiag_flops(d_in: int, d_out: int, num_blocks: int = 4, blockdiag_mix: str = 'each') -> int:
  mixing = d_out * (int(math.log2(num_blocks)) + 1) if mixes(BLOCKDIAG_MIX[blockdiag_mix], d_in, d_out) else 0
  return 2 * d_in * d_out // num_blocks + mixing


def _check_blockdiag(num_blocks: int = 4, blockdiag_mix: str = 'each') -> None:
  del num_blocks
  if blockdiag_mix not in BLOCKDIAG_MIX:
    raise EffjaxError(
      f'model.dense.blockdiag_mix={blockdiag_mix!r} is invalid; valid values: '
      f'{", ".join(BLOCKDIAG_MIX)} '
      "('expanding': one block-Hadamard per MLP, after its first matrix, as in seed 004's Fig. 5)"
    )


register_kind(
  DenseKind(
    'blockdiag',
    build=lambda num_blocks=4, blockdiag_mix='each': functools.partial(
      BlockDiagonalDense, num_blocks=num_blocks, mix=BLOCKDIAG_MIX.get(blockdiag_mix, True)
    ),
    params=lambda d_in, d_out, use_bias=True, num_blocks=4, blockdiag_mix='each': (
      d_in * d_out // num_blocks + (d_out if use_bias else 0)
    ),
    flops=_blockdiag_flops,
    config_keys=('num_blocks', 'blockdiag_mix'),
    decayed=('kernel',),
    check=_check_blockdiag,
  )
)


def emulated_params(d_in: int, d_out: int, use_bias: bool = True) -> int:
  """Parameters of the dense layer a structured layer stands in for."""
  return d_in * d_out + (d_out if use_bias else 0)
