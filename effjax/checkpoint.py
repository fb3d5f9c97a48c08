"""Orbax checkpoints of the train state and the data-iterator state, and inference exports.

A step directory holds three items: `state` (the TrainState), `data` (the grain iterator position, so a resumed
run continues with exactly the next batch) and `meta` (what was trained: model config, vocab, tokens seen), which
lets a resume refuse a checkpoint of another architecture with a clear message instead of a shape error.
"""
from __future__ import annotations

import json
import os

import grain
import jax
import orbax.checkpoint as ocp

from effjax.errors import EffjaxError

# Model keys that change only how a computation runs, not the parameters: they may differ on resume.
RUNTIME_MODEL_KEYS = ('dropout', 'attn_dropout', 'remat', 'attention_impl', 'dtype', 'active_branches')


def architecture(model_config) -> dict:
  return {k: v for k, v in sorted(model_config.to_dict().items()) if k not in RUNTIME_MODEL_KEYS}


class Checkpointer:
  def __init__(self, directory: str, keep: int):
    self.directory = os.path.abspath(directory) if '://' not in directory else directory
    self._mgr = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self) -> int | None:
    return self._mgr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mgr.all_steps())

  def save(self, step: int, state, data_iterator, meta: dict) -> None:
    args = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    if data_iterator is not None:
      args['data'] = grain.checkpoint.CheckpointSave(data_iterator)
    self._mgr.save(step, args=ocp.args.Composite(**args))

  def restore_meta(self, step: int) -> dict:
    return self._mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']

  def restore(self, step: int, abstract_state, data_iterator=None):
    args = dict(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
    if data_iterator is not None:
      args['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._mgr.restore(step, args=ocp.args.Composite(**args))
    return restored['state'], restored['meta']

  def close(self) -> None:
    self._mgr.wait_until_finished()
    self._mgr.close()


def check_compatible(meta: dict, model_config, where: str) -> None:
  """Refuses a checkpoint written for another architecture (family, sizes, sharing, vocab ...)."""
  saved, wanted = meta.get('architecture', {}), architecture(model_config)
  diffs = [f'{k}: checkpoint {saved.get(k)!r} vs config {wanted.get(k)!r}'
           for k in sorted(set(saved) | set(wanted)) if _norm(saved.get(k)) != _norm(wanted.get(k))]
  if diffs:
    raise EffjaxError(f'checkpoint in {where} does not match the config ({"; ".join(diffs)}); use another '
                      'workdir or the config it was trained with')


def _norm(value):
  return list(value) if isinstance(value, (tuple, list)) else value


def write_json_atomic(path: str, obj) -> None:
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=str)
  os.replace(tmp, path)


def is_primary() -> bool:
  return jax.process_index() == 0


# ----------------------------------------------------------------------------------------------------------
# Inference exports: params (+ frozen/constant collections) only, with the config, tokenizer and metadata.

EXPORT_FILES = ('config.json', 'metadata.json', 'tokenizer.json')


def export(export_dir: str, variables: dict, config, tokenizer_path: str, metadata: dict,
           dtype: str = 'float32') -> None:
  import shutil  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  export_dir = os.path.abspath(export_dir)
  if os.path.exists(os.path.join(export_dir, 'metadata.json')):
    raise EffjaxError(f'export_dir {export_dir!r} already holds an export; choose a new directory')
  try:
    os.makedirs(export_dir, exist_ok=True)
  except OSError as e:
    raise EffjaxError(f'export_dir {export_dir!r} is not writable ({e.strerror})') from None
  cast = jnp.dtype(dtype)
  variables = jax.tree.map(lambda x: x.astype(cast) if jnp.issubdtype(x.dtype, jnp.floating) else x, variables)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(export_dir, 'variables'), variables)
  config_dict = config.to_dict()
  config_dict['model']['param_dtype'] = dtype
  write_json_atomic(os.path.join(export_dir, 'config.json'), config_dict)
  shutil.copyfile(tokenizer_path, os.path.join(export_dir, 'tokenizer.json'))
  write_json_atomic(os.path.join(export_dir, 'metadata.json'),
                    {**metadata, 'scanned_layers': bool(config.model.scan_layers), 'dtype': dtype})


def load_export(export_dir: str):
  """(model, variables, config) from an export directory; clear errors for missing or corrupt exports."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  from effjax.models import build_model  # pylint: disable=import-outside-toplevel
  from effjax import accounting  # pylint: disable=import-outside-toplevel
  missing = [f for f in (*EXPORT_FILES, 'variables') if not os.path.exists(os.path.join(export_dir, f))]
  if missing:
    raise EffjaxError(f'{export_dir!r} is not an effjax export (missing {", ".join(missing)}); create one with '
                      '--mode=export --export_dir=DIR')
  try:
    with open(os.path.join(export_dir, 'config.json'), encoding='utf-8') as f:
      config = ml_collections.ConfigDict(json.load(f))
  except (OSError, ValueError) as e:
    raise EffjaxError(f'export config {export_dir}/config.json is unreadable ({e})') from None
  model = build_model(config.model)
  abstract = accounting.abstract_variables(config.model)
  abstract.pop('cache', None)
  try:
    with ocp.StandardCheckpointer() as ckptr:
      variables = ckptr.restore(os.path.join(os.path.abspath(export_dir), 'variables'), abstract)
  except Exception as e:  # pylint: disable=broad-except
    raise EffjaxError(f'export variables in {export_dir!r} are unreadable or do not match its config '
                      f'({type(e).__name__})') from None
  return model, variables, config
