"""The train state and everything derived from a config before the first step: model, optimizer, mesh,
abstract state (via jax.eval_shape, no allocation) and its shardings. Shared by every mode."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
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
  abstract_state: TrainState  # ShapeDtypeStructs carrying their shardings
  state_shardings: TrainState
  batch_sharding: NamedSharding
  init_fn: Any  # rng -> TrainState, jitted with out_shardings


def init_variables(model, rng, seq_len: int = 1) -> dict:
  """model.init on [1, seq_len] zeros (params and dropout keys from rng), boxed, without the decode cache."""
  variables = dict(model.init({'params': rng, 'dropout': rng}, jnp.zeros((1, seq_len), jnp.int32), train=False))
  variables.pop('cache', None)
  return variables


@functools.lru_cache(maxsize=32)
def _abstract(model_config: ml_collections.FrozenConfigDict):
  model = build_model(model_config)
  return model, jax.eval_shape(functools.partial(init_variables, model), jax.random.key(0))


def abstract_model(model_config) -> tuple[nn.Module, dict]:
  """The Module and its boxed abstract variables (jax.eval_shape: no allocation), built once per distinct model
  config however many parts of a start ask (training, memory planning, accounting, export, conversion)."""
  return _abstract(ml_collections.FrozenConfigDict(model_config))


def abstract_variables(model_config) -> dict:
  """Shapes and dtypes of every variable collection but the cache (a fresh tree: callers may edit it)."""
  return nn.unbox(abstract_model(model_config)[1])


def make_setup(config, *, with_optimizer: bool = True, devices=None) -> Setup:
  model, boxed = abstract_model(config.model)
  optimizer = optim.make_optimizer(config.train) if with_optimizer else optax.identity()
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = sharding.rules(config.mesh)

  def init_boxed(rng):
    variables = init_variables(model, rng, config.data.seq_len)
    return variables.pop('params'), variables

  boxed_params, boxed_extra = boxed['params'], {k: v for k, v in boxed.items() if k != 'params'}
  param_shardings = sharding.logical_shardings(boxed_params, mesh, rules)
  extra_shardings = sharding.logical_shardings(boxed_extra, mesh, rules)
  abstract_params = nn.unbox(boxed_params)
  abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
  replicated = NamedSharding(mesh, jax.sharding.PartitionSpec())
  # Optimizer moments shard like their params; scalars (counts) are replicated.
  opt_shardings = optax.tree_map_params(
    optimizer, lambda _, s: s, abstract_opt, param_shardings, transform_non_params=lambda _: replicated
  )
  state_shardings = TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings, extra=extra_shardings)

  def init(rng):
    params, extra = nn.unbox(init_boxed(rng))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params), extra=extra)

  abstract = jax.eval_shape(init, jax.random.key(0))
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_shardings)
  init_fn = jax.jit(init, out_shardings=state_shardings)
  return Setup(
    model=model,
    optimizer=optimizer,
    mesh=mesh,
    rules=rules,
    abstract_state=abstract,
    state_shardings=state_shardings,
    batch_sharding=sharding.batch_sharding(mesh, rules),
    init_fn=init_fn,
  )
