"""Model registry: `build_model(config.model)` returns the flax Module of the configured family.

Adding a family means writing one module and registering its builder here; the training loop never changes.
"""
from __future__ import annotations

import importlib
import pkgutil

import ml_collections

from effjax.errors import EffjaxError
from effjax.models import validate

_FAMILIES = {}


def register(family: str):
  def wrap(cls):
    _FAMILIES[family] = cls
    return cls
  return wrap


def families() -> list[str]:
  _load_families()
  return sorted(_FAMILIES)


def _load_families():
  if _FAMILIES:
    return
  from effjax.models import compressed, gpt, parallel  # pylint: disable=import-outside-toplevel
  _FAMILIES['gpt'] = gpt.GPT
  _FAMILIES['pgpt'] = parallel.ParallelGPT
  _FAMILIES['lcgpt'] = compressed.LinearlyCompressedGPT
  _FAMILIES['ccgpt'] = compressed.ConvCompressedGPT


_DISCOVERED = []


def discover() -> None:
  """Imports every module of this package once, so each registers what it defines (its dense kinds)."""
  if _DISCOVERED:
    return
  _DISCOVERED.append(True)
  for info in pkgutil.iter_modules(__path__):
    importlib.import_module(f'{__name__}.{info.name}')


def param_keys(model_config) -> tuple[str, ...]:
  """'family' and the config keys the family declares as shaping its parameters (what a checkpoint is checked
  against): a key no family or kind declares never makes a checkpoint incompatible."""
  _load_families()
  if model_config.family not in _FAMILIES:
    raise EffjaxError(f'model.family={model_config.family!r} is unknown; valid families: {", ".join(_FAMILIES)}')
  return ('family', *_FAMILIES[model_config.family].param_keys(model_config))


def build_model(model_config: ml_collections.ConfigDict):
  """Checks the model config (one clear error line per mistake) and returns the Module."""
  _load_families()
  validate.check_model_config(model_config, sorted(_FAMILIES))
  frozen = ml_collections.FrozenConfigDict(model_config)
  return _FAMILIES[model_config.family](frozen)
