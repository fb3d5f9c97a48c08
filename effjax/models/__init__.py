"""Model registry: `build_model(config.model)` returns the flax Module of the configured family; `resolve(config)`
is a start's one resolve-and-validate step of the model config (main.run calls it before any mode runs).

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
  module: Callable[[Any], Any]  # FrozenConfigDict -> the flax Module
  forward_flops: Callable[[Any, int], int]  # (cfg, seq_len) -> forward FLOPs per token of the net as built
  check: Callable[[Any], None] | None = None  # family-specific config checks (one EffjaxError line each)
  param_keys: Callable[[Any], tuple[str, ...]] = layers.param_keys  # config keys that shape its parameters
  summary_extras: Callable[[Any, dict], dict] | None = None  # (cfg, abstract variables) -> extra summary keys
  # memory planner: ('block' | 'frozen', width, heads, applications) of every layer the forward runs, the bytes
  # per token (given the compute dtype's size) it keeps outside them, and the top-level params outside the stack
  memory_blocks: Callable[[Any], list[tuple[str, int, int, int]]] = plain_memory_blocks
  memory_extra_bytes: Callable[[Any, int], float] | None = None
  outside_params: tuple[str, ...] = ('embed', 'head', 'ln_f')
  doping: bool = False  # whether its stack honours model.doping (effjax/models/doped.py)


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


# ----------------------------------------------------------------------------------------------------------
# Resolving and checking a model config: once per start (main.run -> resolve), once per distinct config for a
# library caller that builds models directly (build_model checks what it has not seen).

_CHECKED: dict = {}  # check keys of the model configs already checked, oldest first
_MAX_CHECKED = 256


def _check_key(frozen: ml_collections.FrozenConfigDict) -> frozenset:
  """What the checks depend on: every model key but vocab_size (any positive size passes; checked on its own, so a
  config checked before the tokenizer gave its size counts as checked after)."""
  return frozenset((k, v) for k, v in frozen.items() if k != 'vocab_size')


def _check(model_config, vocab_known: bool = True) -> ml_collections.FrozenConfigDict:
  frozen = (
    model_config
    if isinstance(model_config, ml_collections.FrozenConfigDict)
    else ml_collections.FrozenConfigDict(model_config)
  )
  key = _check_key(frozen)
  if key not in _CHECKED:
    validate.check_model_config(frozen, families(), vocab_known=False)
    _CHECKED[key] = True
    if len(_CHECKED) > _MAX_CHECKED:
      del _CHECKED[next(iter(_CHECKED))]
  if vocab_known or frozen.get('vocab_size') != 0:
    validate.check_positive(frozen, 'vocab_size')
  return frozen


def resolve(config) -> None:
  """The one resolve-and-validate step of a start (main.run, every mode, before it runs): model keys of the older
  flat layout that a config file still sets move into their sections (configs/base.py MOVED_MODEL_KEYS; one
  warning line each), then the model config is checked: one EffjaxError line per mistake. vocab_size 0 (taken
  from the tokenizer once the data is known) passes. Models built from this config later are not checked again."""
  migrate_flat_keys(config.model)
  _check(config.model, vocab_known=False)


def migrate_flat_keys(model_config) -> None:
  """Moves flat keys of the older layout (model.num_blocks) into their sections (model.dense.num_blocks) in place.
  A live config has every section already, so the flat value, which its file set, wins over the section's."""
  from absl import logging  # pylint: disable=import-outside-toplevel
  from effjax.configs import base  # pylint: disable=import-outside-toplevel

  for old, new in base.MOVED_MODEL_KEYS.items():
    if old not in model_config or isinstance(model_config[old], ml_collections.ConfigDict):
      continue
    section, key = new.split('.')
    if not isinstance(model_config.get(section), ml_collections.ConfigDict):
      raise EffjaxError(
        f'model.{old} has moved to model.{new}, and model.{section} is no section; set model.{new} instead'
      )
    with model_config.unlocked():
      value = model_config[old]
      del model_config[old]
      model_config[section][key] = value
    logging.warning(
      'model.%s has moved to model.%s: read as model.%s=%r (set that key in the config)', old, new, new, value
    )


def build_model(model_config: ml_collections.ConfigDict):
  """The Module of the configured family. A config not checked yet (a library caller building directly) is checked
  first, one clear error line per mistake; one that `resolve` or an earlier build checked is not checked again."""
  frozen = _check(model_config)
  return family(frozen.family).module(frozen)
