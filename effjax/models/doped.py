"""Doping (seed 004, §3): frozen, randomly initialised MLP layers interleaved with trainable transformer blocks.

`config.model.doping.pattern` picks the layout of the stack, read bottom (input side) to top:
  ''            off: a plain GPT.
  'interleave'  T(FT)^(L-1): the model.num_layers = L trainable blocks with one frozen MLP between each pair,
                2L-1 layers in all (the seed's Doped XSmall / Small / Medium: 3+2, 6+5, 12+11).
  'TFTFFT' ...  an explicit pattern: T a trainable block, F a frozen MLP. The first and last layer must be T and
                the number of T's must equal model.num_layers (num_layers always counts trainable blocks).

A frozen layer (seed: "replace a decoder layer with a single frozen MLP ... hidden 6·d") is a residual MLP
without attention, x + W2·gelu(W1·norm(x)) (pre-LN; post-LN models use norm(x + W2·gelu(W1·x))), with
W1 [d, r·d], W2 [r·d, d], r = model.doping.frozen_mlp_ratio. It has no trainable parameter at all: its norm has no
scale or bias, and it has no biases (a frozen zero bias would only be a stored zero). So a frozen layer holds
exactly 2·r·d² weights (12·d² for r=6, the size of the transformer layer it replaces), and a doped model has
exactly the trainable parameters of the undoped GPT with the same trainable blocks. W1, W2 are drawn once at
init like a trainable MLP's (N(0, 0.02²) and N(0, 0.02²/(2·depth)); depth = all layers, which also scales the
trainable blocks' residual projections), are always dense (model.mlp_kind only changes the trainable MLPs), and
see the same dropout as a trainable MLP (hidden and residual).

The weights live in the variable collection 'frozen', never in 'params': the optimizer never sees them (no
gradient, no moments), the forward wraps them in stop_gradient as well, and the train state keeps them in
`TrainState.extra`, which is checkpointed. They are stored, not re-derived from the seed: a restored or exported
model carries its own frozen weights. They carry logical axis names (('embed', 'mlp'), ('mlp', 'embed')) like
any kernel, so they shard with the same rules.

Stacking goes through `layers.LayerStack` (scanned or unrolled, remat): the stack is cut into "units", a trainable
block followed by the frozen MLPs up to the next block, and each run of consecutive units of the same shape is one
LayerStack (`stack/run_{i}/layers/{block,frozen_0,...}`). 'interleave' gives two runs: L-1 units (block + frozen
MLP) and the last block alone.
"""

from __future__ import annotations

import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from effjax.errors import EffjaxError
from effjax.models import layers


def parse_doping(doping: str, num_layers: int) -> tuple[int, ...]:
  """The number of frozen MLPs after each of the `num_layers` trainable blocks (the last entry is always 0).

  Raises EffjaxError (one line) for a malformed pattern.
  """
  if not isinstance(doping, str):
    raise EffjaxError(
      f"model.doping.pattern={doping!r} is invalid; use '' (off), 'interleave' or a T/F pattern such as 'TFTFT'"
    )
  if doping == '':
    return (0,) * num_layers
  if doping == 'interleave':
    return (1,) * (num_layers - 1) + (0,)
  bad = sorted(set(doping) - set('TF'))
  if bad:
    raise EffjaxError(
      f"model.doping.pattern={doping!r} is invalid: {''.join(bad)!r} is not T or F; use '' (off), "
      "'interleave' or a pattern of T (trainable block) and F (frozen MLP) such as 'TFTFT'"
    )
  if doping[0] != 'T' or doping[-1] != 'T':
    raise EffjaxError(
      f"model.doping.pattern={doping!r} is invalid: the first and last layers must be trainable (T), e.g. 'TFTFT'"
    )
  trainable = doping.count('T')
  if trainable != num_layers:
    raise EffjaxError(
      f'model.doping.pattern={doping!r} has {trainable} trainable blocks (T) but model.num_layers='
      f'{num_layers}; num_layers counts the trainable blocks: set it to {trainable}'
    )
  return tuple(len(run) for run in doping.split('T')[1:])


def doping(cfg) -> str:
  """model.doping.pattern: '' (off), 'interleave' or a T/F pattern."""
  section = cfg.get('doping')
  return section.get('pattern', '') if section is not None else ''


def pattern(cfg) -> str:
  """The layer pattern as T/F letters, input side first ('T' * L when doping is off)."""
  return ''.join('T' + 'F' * k for k in parse_doping(doping(cfg), cfg.num_layers))


def check(m, family: str) -> None:
  """Config checks for doping (called by validate.check_model_config)."""
  if not doping(m):
    return
  from effjax import models  # pylint: disable=import-outside-toplevel

  if not models.family(family).doping:
    supported = [name for name in models.families() if models.family(name).doping]
    raise EffjaxError(
      f'model.doping.pattern={doping(m)!r} is not supported by model.family={family!r}; doping works '
      f'with: {", ".join(supported)}'
    )
  parse_doping(doping(m), m.num_layers)
  ratio = m.doping.frozen_mlp_ratio
  if not isinstance(ratio, int) or isinstance(ratio, bool) or ratio <= 0:
    raise EffjaxError(f'model.doping.frozen_mlp_ratio={ratio!r} is invalid; it must be a positive integer')
  if m.share_layers != 'none':
    raise EffjaxError(
      f"model.doping.pattern={doping(m)!r} needs model.share_layers='none' (got {m.share_layers!r}): "
      'a doped stack has independent trainable blocks'
    )


def param_keys(cfg) -> tuple[str, ...]:
  """The doping keys that shape a family's parameters (frozen_mlp_ratio only matters when doping is on)."""
  return ('doping.pattern', 'doping.frozen_mlp_ratio') if doping(cfg) else ('doping.pattern',)


def depth(cfg) -> int:
  """All layers, trainable and frozen."""
  return cfg.num_layers + sum(parse_doping(doping(cfg), cfg.num_layers))


class FrozenMlp(nn.Module):
  """x + W2·gelu(W1·norm(x)) with W1, W2 in the 'frozen' collection (never trained); see the module docstring."""

  cfg: layers.Config
  d_model: int
  num_layers: int = 1  # total depth, for the GPT-2 scaling of W2's init
  train: bool = False

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    cfg = self.cfg
    d, f = self.d_model, cfg.doping.frozen_mlp_ratio * self.d_model
    pdt, dt = layers.dtype_of(cfg.param_dtype), layers.dtype_of(cfg.dtype)
    fc_init = layers.normal_init(layers.INIT_STD, ('embed', 'mlp'))
    proj_init = layers.normal_init(layers.INIT_STD / math.sqrt(2 * self.num_layers), ('mlp', 'embed'))
    # Drawn only when the variable does not exist yet (init); afterwards the stored value is used.
    fc_DxF = self.variable('frozen', 'fc', lambda: fc_init(self.make_rng('params'), (d, f), pdt)).value
    proj_FxD = self.variable('frozen', 'proj', lambda: proj_init(self.make_rng('params'), (f, d), pdt)).value
    fc_DxF, proj_FxD = (jax.lax.stop_gradient(w).astype(dt) for w in (fc_DxF, proj_FxD))
    norm = _plain_norm(cfg)
    drop = lambda y: nn.Dropout(cfg.dropout)(y, deterministic=not self.train)

    def mlp(h_BxTxD):
      h_BxTxF = drop(nn.gelu(h_BxTxD.astype(dt) @ fc_DxF))
      return drop(h_BxTxF @ proj_FxD)

    if cfg.norm_position == 'pre':
      return x_BxTxD + mlp(norm(x_BxTxD)).astype(x_BxTxD.dtype)
    return norm(x_BxTxD + mlp(x_BxTxD).astype(x_BxTxD.dtype)).astype(x_BxTxD.dtype)


def _plain_norm(cfg) -> nn.Module:
  """The model's norm kind without scale or bias (a frozen layer has nothing trainable); statistics in f32."""
  if cfg.norm == 'rmsnorm':
    return nn.RMSNorm(epsilon=1e-5, use_scale=False, dtype=jnp.float32, name='norm')
  return nn.LayerNorm(epsilon=1e-5, use_scale=False, use_bias=False, dtype=jnp.float32, name='norm')


class DopedUnit(nn.Module):
  """A trainable transformer block followed by `num_frozen` frozen MLPs: the body LayerStack applies."""

  cfg: layers.Config
  d_model: int
  num_heads: int
  num_frozen: int
  num_layers: int = 1
  train: bool = False
  decode: bool = False
  carry_output: bool = False

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, positions_T: jax.Array):
    x_BxTxD = layers.Block(
      self.cfg, self.d_model, self.num_heads, self.num_layers, self.train, self.decode, name='block'
    )(x_BxTxD, positions_T)
    for i in range(self.num_frozen):
      x_BxTxD = FrozenMlp(self.cfg, self.d_model, self.num_layers, self.train, name=f'frozen_{i}')(x_BxTxD)
    return (x_BxTxD, None) if self.carry_output else x_BxTxD


class DopedStack(nn.Module):
  """The doped layer stack: one LayerStack per run of identical units (scan_layers / remat as configured)."""

  cfg: layers.Config
  train: bool = False
  decode: bool = False

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, positions_T: jax.Array) -> jax.Array:
    cfg = self.cfg
    runs = [(k, len(list(group))) for k, group in itertools.groupby(parse_doping(doping(cfg), cfg.num_layers))]
    for i, (num_frozen, count) in enumerate(runs):
      x_BxTxD = layers.LayerStack(
        block_cls=DopedUnit,
        block_kwargs=dict(
          cfg=cfg,
          d_model=cfg.d_model,
          num_heads=cfg.num_heads,
          num_frozen=num_frozen,
          num_layers=depth(cfg),
          train=self.train,
          decode=self.decode,
        ),
        num_layers=count,
        scan=cfg.scan_layers,
        share='none',
        remat=cfg.remat,
        name=f'run_{i}',
      )(x_BxTxD, positions_T)
    return x_BxTxD


# ----------------------------------------------------------------------------------------------------------
# Accounting


def frozen_params_per_layer(cfg) -> int:
  return 2 * cfg.doping.frozen_mlp_ratio * cfg.d_model**2


def num_frozen_layers(cfg) -> int:
  return sum(parse_doping(doping(cfg), cfg.num_layers))


def frozen_forward_flops(cfg) -> int:
  """Forward FLOPs per token of all frozen MLPs (two dense matmuls each; the parameter-free norm is ignored)."""
  return num_frozen_layers(cfg) * 2 * frozen_params_per_layer(cfg)


def summary_extras(cfg, abstract_variables) -> dict:
  count = lambda tree: int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))
  frozen_layers = num_frozen_layers(cfg)
  return {
    'doping': doping(cfg),
    'layer_pattern': pattern(cfg),
    'trainable_layers': cfg.num_layers,
    'frozen_layers': frozen_layers,
    'total_layers': cfg.num_layers + frozen_layers,
    'params_per_block': count(abstract_variables.get('params', {}).get('stack', {})) // cfg.num_layers,
    'frozen_params_per_layer': frozen_params_per_layer(cfg),
  }
