"""The train state and everything derived from a config before the first step: model, optimizer, mesh,
abstract state (via jax.eval_shape, no allocation) and its shardings. Shared by every mode."""
from __future__ import annotations

import dataclasses
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from effjax import optim, sharding
from effjax.models import build_model


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  extra: Any  # non-trainable variable collections ('frozen', 'constants'): checkpointed, never optimised

  def variables(self) -> dict:
    return {'params': self.params, **self.extra}


@dataclasses.dataclass
class Setup:
  model: nn.Module
  optimizer: optax.GradientTransformation
  mesh: Mesh
  rules: tuple
  abstract_state: TrainState        # ShapeDtypeStructs carrying their shardings
  state_shardings: TrainState
  batch_sharding: NamedSharding
  init_fn: Any                      # rng -> TrainState, jitted with out_shardings


def _init_variables(model, config, rng):
  tokens = jnp.zeros((1, config.data.seq_len), jnp.int32)
  return model.init({'params': rng, 'dropout': rng}, tokens, train=False)


def make_setup(config, *, with_optimizer: bool = True, devices=None) -> Setup:
  model = build_model(config.model)
  optimizer = optim.make_optimizer(config.train) if with_optimizer else optax.identity()
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = sharding.rules(config.mesh)

  def init_boxed(rng):
    variables = dict(_init_variables(model, config, rng))
    params = variables.pop('params')
    variables.pop('cache', None)
    return params, variables

  boxed_params, boxed_extra = jax.eval_shape(init_boxed, jax.random.key(0))
  param_shardings = sharding.logical_shardings(boxed_params, mesh, rules)
  extra_shardings = sharding.logical_shardings(boxed_extra, mesh, rules)
  abstract_params = nn.unbox(boxed_params)
  abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
  replicated = NamedSharding(mesh, jax.sharding.PartitionSpec())
  # Optimizer moments shard like their params; scalars (counts) are replicated.
  opt_shardings = optax.tree_map_params(optimizer, lambda _, s: s, abstract_opt, param_shardings,
                                        transform_non_params=lambda _: replicated)
  state_shardings = TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings,
                               extra=extra_shardings)

  def init(rng):
    params, extra = nn.unbox(init_boxed(rng))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      extra=extra)

  abstract = jax.eval_shape(init, jax.random.key(0))
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                          state_shardings)
  init_fn = jax.jit(init, out_shardings=state_shardings)
  return Setup(model=model, optimizer=optimizer, mesh=mesh, rules=rules, abstract_state=abstract,
               state_shardings=state_shardings, batch_sharding=sharding.batch_sharding(mesh, rules),
               init_fn=init_fn)
