"""Model registry: `build_model(config.model)` returns the flax Module of the configured family.

A family is one `Family` entry that its own module registers (`register_family`): how to build it, its config
checks, forward FLOPs per token, summary extras, the config keys that shape its parameters, what the memory
planner needs and whether it takes doping. Every module of this package is imported once (`discover`) so that
it can register its families and dense kinds; a family defined elsewhere (a test, a user's file) registers the
same way. The shared modules (checkpoint, memory, accounting, optim) ask this registry and name no family.
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Any, Callable

import ml_collections

from effjax.errors import EffjaxError
from effjax.models import layers, validate


def plain_memory_blocks(cfg) -> list[tuple[str, int, int, int]]:
  """num_layers transformer blocks of width d_model (a shared block is still applied num_layers times)."""
  return [('block', cfg.d_model, cfg.num_heads, cfg.num_layers)]


@dataclasses.dataclass(frozen=True)
class Family:
  """Everything the stack knows about one model family."""
  name: str
  module: Callable[[Any], Any]                   # FrozenConfigDict -> the flax Module
  forward_flops: Callable[[Any, int], int]       # (cfg, seq_len) -> forward FLOPs per token of the net as built
  check: Callable[[Any], None] | None = None     # family-specific config checks (one EffjaxError line each)
  param_keys: Callable[[Any], tuple[str, ...]] = layers.param_keys  # config keys that shape its parameters
  summary_extras: Callable[[Any, dict], dict] | None = None  # (cfg, abstract variables) -> extra summary keys
  # memory planner: ('block' | 'frozen', width, heads, applications) of every layer the forward runs, the bytes
  # per token (given the compute dtype's size) it keeps outside them, and the top-level params outside the stack
  memory_blocks: Callable[[Any], list[tuple[str, int, int, int]]] = plain_memory_blocks
  memory_extra_bytes: Callable[[Any, int], float] | None = None
  outside_params: tuple[str, ...] = ('embed', 'head', 'ln_f')
  doping: bool = False                           # whether its stack honours model.doping (effjax/models/doped.py)


_FAMILIES: dict[str, Family] = {}
_DISCOVERED = []


def register_family(entry: Family) -> Family:
  """Adds (or replaces) a family; the built-in ones stay registered whatever is added first."""
  _FAMILIES[entry.name] = entry
  return entry


def discover() -> None:
  """Imports every module of this package once, so each registers what it defines (families, dense kinds)."""
  if _DISCOVERED:
    return
  _DISCOVERED.append(True)
  for info in pkgutil.iter_modules(__path__):
    importlib.import_module(f'{__name__}.{info.name}')


def families() -> list[str]:
  discover()
  return sorted(_FAMILIES)


def family(name: str) -> Family:
  discover()
  if name not in _FAMILIES:
    raise EffjaxError(f'model.family={name!r} is unknown; valid families: {", ".join(sorted(_FAMILIES))}')
  return _FAMILIES[name]


def param_keys(model_config) -> tuple[str, ...]:
  """'family' and the config keys the family declares as shaping its parameters (what a checkpoint is checked
  against): a key no family or kind declares never makes a checkpoint incompatible."""
  return ('family', *family(model_config.family).param_keys(model_config))


def build_model(model_config: ml_collections.ConfigDict):
  """Checks the model config (one clear error line per mistake) and returns the Module."""
  validate.check_model_config(model_config, families())
  return family(model_config.family).module(ml_collections.FrozenConfigDict(model_config))
