"""Orbax checkpoints of the train state and the data-iterator state, and inference exports.

A step directory holds three items: `state` (the TrainState), `data` (the grain iterator position, so a resumed
run continues with exactly the next batch) and `meta` (what was trained: model config, vocab, tokens seen), which
lets a resume refuse a checkpoint of another architecture with a clear message instead of a shape error.
"""

from __future__ import annotations

import contextlib
import json
import os
import time

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging

from effjax import errors, paths
from effjax.errors import EffjaxError


def architecture(model_config) -> dict:
  """The model settings a checkpoint's parameters depend on: the keys its family declares (models.param_keys;
  'section.key' for a key of a family's or kind's section), None where the config lacks one. Recorded in each
  checkpoint and compared on resume and when loading."""
  from effjax.models import param_keys  # pylint: disable=import-outside-toplevel

  return {k: lookup(model_config, k) for k in sorted(set(param_keys(model_config)))}


def lookup(model_config, key: str):
  """model_config's value of a dotted key ('pgpt.num_branches'), None where it has none."""
  node = model_config
  for part in key.split('.'):
    node = node.get(part) if hasattr(node, 'get') else None
  return node


def migrate_model(model: dict) -> dict:
  """A saved model section (config.json) in today's layout: the flat keys of older effjax moved into their
  sections (configs/base.py MOVED_MODEL_KEYS). A key already in its section wins over a flat one."""
  from effjax.configs import base  # pylint: disable=import-outside-toplevel

  out = {k: dict(v) if isinstance(v, dict) else v for k, v in model.items()}
  for old, new in base.MOVED_MODEL_KEYS.items():
    section, key = new.split('.')
    if old not in out or isinstance(out[old], dict):
      continue
    value = out.pop(old)
    if not isinstance(out.setdefault(section, {}), dict):
      raise EffjaxError(
        f'saved model config has both model.{old} and a model.{section} value that is no section; '
        'it was not written by effjax'
      )
    out[section].setdefault(key, value)
  return out


def migrate_architecture(saved: dict) -> dict:
  """A checkpoint's recorded architecture with older flat key names renamed to today's dotted ones."""
  from effjax.configs import base  # pylint: disable=import-outside-toplevel

  return {base.MOVED_MODEL_KEYS.get(k, k): v for k, v in saved.items()}


class Checkpointer:
  """`read_only=True` for eval, sample and export: nothing is created, cleaned up or saved in the workdir."""

  def __init__(self, directory: str, keep: int, read_only: bool = False):
    quiet_aborted_restore_callbacks()
    self.directory = paths.abspath(directory)
    self._mgr = ocp.CheckpointManager(
      self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only, read_only=read_only)
    )
    self._saving = None  # (step, bytes) of the last save started

  def latest_step(self) -> int | None:
    return self._mgr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mgr.all_steps())

  def save(self, step: int, state, data_iterator, meta: dict) -> None:
    """Starts an (asynchronous) save; a full disk, here or in the previous save, is one EffjaxError line."""
    args = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    if data_iterator is not None:
      args['data'] = grain.checkpoint.CheckpointSave(data_iterator)
    with self._no_space_is_one_line(step):
      saved = self._mgr.save(step, args=ocp.args.Composite(**args))
    self._saving = (step, sum(x.nbytes for x in jax.tree.leaves(state)))
    if not saved:
      logging.warning(
        'checkpoint step %d was not saved (orbax declined: a step >= %d already exists in %s)',
        step,
        step,
        self.directory,
      )

  @contextlib.contextmanager
  def _no_space_is_one_line(self, step: int):
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except
      if not errors.is_no_space(e):
        raise
      failed, needed = self._saving if self._saving else (step, None)
      self._remove_partial_saves()
      raise errors.no_space_error(
        paths.join(self.directory, str(failed)), needed, f'checkpoint step {failed}'
      ) from None

  def _remove_partial_saves(self) -> None:
    """A save that ran out of space leaves orbax's temporary step directory: removed to give the space back
    (the steps already saved are untouched). Orbax's other save threads may still be finishing after the failed
    one reported (seen under load: a metadata thread recreating the directory), so the removal repeats until the
    directory stays gone."""
    pattern = paths.join(self.directory, '*.orbax-checkpoint-tmp*')
    quiet = 0
    for _ in range(50):
      partials = paths.glob(pattern)
      for partial in partials:
        with contextlib.suppress(FileNotFoundError):
          paths.rmtree(partial)
      quiet = 0 if partials else quiet + 1
      if quiet == 3:
        return
      time.sleep(0.1)

  def restore_meta(self, step: int) -> dict:
    return self._mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']

  def restore(self, step: int, abstract_state, data_iterator=None):
    """(state, meta) of `step`. An abstract state without optimizer leaves (eval, sample, export: the setup's
    optimizer is optax.identity) restores the step, params and other collections only, not the Adam moments."""
    # The state first, on its own: restoring it together with the data iterator makes a corrupt state file
    # spray asyncio "Event loop is closed" tracebacks (tensorstore callbacks into the aborted composite restore).
    if jax.tree.leaves(abstract_state.opt_state):
      state_args = ocp.args.StandardRestore(abstract_state)
    else:
      item = {'step': abstract_state.step, 'params': abstract_state.params, 'extra': abstract_state.extra}
      state_args = ocp.args.PyTreeRestore(
        item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True
      )
    restored = self._mgr.restore(step, args=ocp.args.Composite(state=state_args, meta=ocp.args.JsonRestore()))
    state = restored['state']
    if isinstance(state, dict):
      state = abstract_state.replace(step=state['step'], params=state['params'], extra=state['extra'])
    if data_iterator is not None:
      self._mgr.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(data_iterator)))
    return state, restored['meta']

  def quarantine(self, step: int) -> str:
    """Moves an unrestorable step aside (to DIR.corrupt/STEP), so it is neither retried on every start nor
    blocks saving that step again (orbax silently skips saving a step <= its newest one). Returns the new path.
    Process 0 moves; then every process calls reload()."""
    self._mgr.wait_until_finished()
    target_root = f'{self.directory}.corrupt'
    paths.makedirs(target_root)
    target = paths.join(target_root, str(step))
    n = 1
    while paths.exists(target):
      target, n = paths.join(target_root, f'{step}.{n}'), n + 1
    paths.move_tree(paths.join(self.directory, str(step)), target)
    return target

  def reload(self) -> None:
    """Re-reads the step directories (after quarantine)."""
    self._mgr.reload()

  def close(self) -> None:
    with self._no_space_is_one_line(-1):
      self._mgr.wait_until_finished()
    self._mgr.close()


_QUIET_HOOK_INSTALLED = False


def quiet_aborted_restore_callbacks() -> None:
  """When a restore fails (a corrupt file), tensorstore completes the remaining reads and calls back into the
  asyncio loop that orbax already closed: each callback reports "RuntimeError: Event loop is closed" through
  sys.unraisablehook (a screen of tracebacks that hides the real one-line message). Installed before any
  restore, this drops exactly those reports (nothing else) for the rest of the process."""
  global _QUIET_HOOK_INSTALLED  # pylint: disable=global-statement
  if _QUIET_HOOK_INSTALLED:
    return
  import sys  # pylint: disable=import-outside-toplevel

  previous = sys.unraisablehook

  def hook(unraisable):
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and 'Event loop is closed' in str(exc):
      return
    previous(unraisable)

  sys.unraisablehook = hook
  _QUIET_HOOK_INSTALLED = True


def check_compatible(meta: dict, model_config, where: str) -> None:
  """Refuses a checkpoint written for another architecture (family, sizes, sharing, vocab ...)."""
  saved, wanted = migrate_architecture(meta.get('architecture', {})), architecture(model_config)
  # Compared over the declared keys the checkpoint records: one written before a key was declared predates it.
  diffs = [
    f'{k}: checkpoint {saved[k]!r} vs config {v!r}'
    for k, v in wanted.items()
    if k in saved and _norm(saved[k]) != _norm(v)
  ]
  if diffs:
    raise EffjaxError(
      f'checkpoint in {where} does not match the config ({"; ".join(diffs)}); use another '
      'workdir or the config it was trained with'
    )


def _norm(value):
  return list(value) if isinstance(value, (tuple, list)) else value


def write_json_atomic(path: str, obj) -> None:
  """Local: renamed into place; gs://: one upload (an object appears whole)."""
  paths.write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str))


# ----------------------------------------------------------------------------------------------------------
# Inference exports: params (+ frozen/constant collections) only, with the config, tokenizer and metadata.
#
#   E/variables/      Orbax StandardCheckpointer tree {'params': ..., 'frozen'?: ..., 'constants'?: ...}
#   E/config.json     the resolved config (model.param_dtype = the export dtype, model.scan_layers = the layout)
#   E/tokenizer.json  the run's tokenizer
#   E/metadata.json   format, family, effjax version, step, tokens seen, parameter counts, layout, dtype

EXPORT_FILES = ('config.json', 'metadata.json', 'tokenizer.json')
EXPORT_FORMAT = 'effjax-export-v1'
EXPORT_DTYPES = ('float32', 'bfloat16')
LAYOUTS = ('as_trained', 'scanned', 'unscanned')


def relayout(variables: dict, model_config, layout: str):
  """(variables, model_config) with the layer stack scanned (stacked on a leading axis) or unscanned
  (`stack/layer_i`); the weights are the same. Refuses stacks it cannot map (checked against the model)."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  from effjax import state  # pylint: disable=import-outside-toplevel
  from effjax.models import layers  # pylint: disable=import-outside-toplevel

  if layout not in LAYOUTS:
    raise EffjaxError(f'export layout {layout!r} is unknown; valid: {", ".join(LAYOUTS)}')
  scan = {'scanned': True, 'unscanned': False}.get(layout, bool(model_config.scan_layers))
  if scan == bool(model_config.scan_layers):
    return variables, model_config
  fn = layers.stack_layers if scan else layers.unstack_layers
  out = {c: fn(tree) if isinstance(tree, dict) and 'stack' in tree else tree for c, tree in variables.items()}
  new_config = ml_collections.ConfigDict(model_config.to_dict())
  new_config.scan_layers = scan
  want = state.abstract_variables(new_config)
  shapes = lambda tree: jax.tree.map(lambda x: tuple(x.shape), tree)
  if shapes(out) != shapes(want):
    raise EffjaxError(
      f'cannot convert this {model_config.family} model to the {layout} layout; export it '
      'with --export_layout=as_trained'
    )
  return out, new_config


def check_new_dir(path: str, what: str) -> str:
  paths.check(path, what)
  path = paths.abspath(path)
  if paths.exists(path) and (not paths.isdir(path) or paths.listdir(path)):
    raise EffjaxError(
      f'{what} {path!r} already exists and is not empty; choose a new directory (nothing is overwritten)'
    )
  return path


def _publish(tmp: str, final: str) -> None:
  """Atomically puts a fully written directory in place: a crash never leaves a half export under `final`."""
  if os.path.isdir(final):
    os.rmdir(final)  # empty (checked by check_new_dir)
  os.rename(tmp, final)


def export(
  export_dir: str,
  variables: dict,
  config,
  tokenizer_path: str,
  metadata: dict,
  dtype: str = 'float32',
  layout: str = 'as_trained',
) -> str:
  """Writes an inference export; returns its absolute path. Locally it is written to a temporary sibling and
  renamed into place. An object store has no rename: the export is written in place with metadata.json last, so
  until it is complete it is no export at all (read_export_metadata refuses it), and a failed one is removed."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  export_dir = check_new_dir(export_dir, 'export_dir')
  if dtype not in EXPORT_DTYPES:
    raise EffjaxError(f'export dtype {dtype!r} is invalid; valid: {", ".join(EXPORT_DTYPES)}')
  if not paths.isfile(tokenizer_path):
    raise EffjaxError(f"tokenizer {tokenizer_path!r} does not exist; the export needs the run's tokenizer")
  variables, model_config = relayout(variables, config.model, layout)
  config = ml_collections.ConfigDict(config.to_dict())
  config.model = model_config
  remote = paths.is_remote(export_dir)
  tmp = export_dir if remote else f'{export_dir}.tmp-{os.getpid()}'
  try:
    if not remote:
      os.makedirs(tmp)
  except OSError as e:
    raise EffjaxError(f'export_dir {export_dir!r} is not writable ({e.strerror})') from None
  try:
    cast = jnp.dtype(dtype)
    variables = jax.tree.map(
      lambda x: x.astype(cast) if jnp.issubdtype(x.dtype, jnp.floating) else x, jax.device_get(variables)
    )
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(paths.join(tmp, 'variables'), variables)
    config_dict = config.to_dict()
    config_dict['model']['param_dtype'] = dtype
    write_json_atomic(paths.join(tmp, 'config.json'), config_dict)
    paths.copy_file(tokenizer_path, paths.join(tmp, 'tokenizer.json'))
    write_json_atomic(
      paths.join(tmp, 'metadata.json'),
      {
        'format': EXPORT_FORMAT,
        **metadata,
        'family': config.model.family,
        'scanned_layers': bool(config.model.scan_layers),
        'layout': 'scanned' if config.model.scan_layers else 'unscanned',
        'share_layers': config.model.get('share_layers', 'none'),
        'dtype': dtype,
      },
    )
    if not remote:
      _publish(tmp, export_dir)
  except BaseException:
    paths.rmtree(tmp)
    raise
  return export_dir


def _short(e: BaseException) -> str:
  lines = str(e).strip().splitlines()
  text = lines[0] if lines else type(e).__name__
  return text if len(text) <= 200 else text[:197] + '...'


def read_export_metadata(export_dir: str) -> dict:
  """metadata.json of an export (after checking the directory is one)."""
  paths.check(export_dir, 'export')
  if not paths.exists(export_dir):
    raise EffjaxError(f'export {export_dir!r} does not exist; create one with --mode=export --export_dir=DIR')
  if not paths.isdir(export_dir):
    raise EffjaxError(f'export {export_dir!r} is not a directory; pass the directory written by --mode=export')
  missing = [f for f in (*EXPORT_FILES, 'variables') if not paths.exists(paths.join(export_dir, f))]
  if missing:
    raise EffjaxError(
      f'{export_dir!r} is not an effjax export (missing {", ".join(missing)}); create one with '
      '--mode=export --export_dir=DIR'
    )
  try:
    metadata = json.loads(paths.read_text(paths.join(export_dir, 'metadata.json')))
    if not isinstance(metadata, dict):
      raise ValueError('not a JSON object')
  except (OSError, ValueError) as e:
    raise EffjaxError(f'export metadata {export_dir}/metadata.json is unreadable ({_short(e)})') from None
  return metadata


def _export_config(export_dir: str):
  """The export's config over today's defaults (so an export from an older effjax gains new keys, and the flat
  model keys of older layouts move into their sections)."""
  import ml_collections  # pylint: disable=import-outside-toplevel

  try:
    saved = json.loads(paths.read_text(paths.join(export_dir, 'config.json')))
    if not isinstance(saved, dict) or not isinstance(saved.get('model'), dict):
      raise ValueError('no "model" section')
  except (OSError, ValueError) as e:
    raise EffjaxError(f'export config {export_dir}/config.json is unreadable ({_short(e)})') from None
  saved = {**saved, 'model': migrate_model(saved['model'])}
  from effjax.configs import base  # pylint: disable=import-outside-toplevel

  config = base.get_base()
  try:
    with config.unlocked():
      _merge(config, saved)
  except (TypeError, ValueError, KeyError):  # a value of another type than today's default: keep it as saved
    return ml_collections.ConfigDict(saved)
  return config


def _merge(config, saved: dict) -> None:
  """Saved values into a default config, section by section (JSON lists back to the defaults' tuples)."""
  import ml_collections  # pylint: disable=import-outside-toplevel

  for key, value in saved.items():
    default = config.get(key)
    if isinstance(value, dict) and isinstance(default, ml_collections.ConfigDict):
      _merge(default, value)
      continue
    if isinstance(default, tuple) and isinstance(value, list):
      value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
    config[key] = value


def load_export(export_dir: str):
  """(model, variables, config) from an export directory; clear errors for missing or corrupt exports."""
  from effjax import state  # pylint: disable=import-outside-toplevel

  read_export_metadata(export_dir)
  config = _export_config(export_dir)
  try:
    model, _ = state.abstract_model(config.model)
    abstract = state.abstract_variables(config.model)
  except EffjaxError as e:
    raise EffjaxError(f'export config {export_dir}/config.json is invalid: {e}') from None
  except Exception as e:  # pylint: disable=broad-except
    raise EffjaxError(f'export config {export_dir}/config.json is invalid ({type(e).__name__}: {_short(e)})') from None
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
  quiet_aborted_restore_callbacks()
  try:
    with ocp.StandardCheckpointer() as ckptr:
      variables = ckptr.restore(paths.join(paths.abspath(export_dir), 'variables'), abstract)
  except Exception as e:  # pylint: disable=broad-except
    raise EffjaxError(
      f'export variables in {export_dir!r} are unreadable or do not match its config ({type(e).__name__}: {_short(e)})'
    ) from None
  return model, variables, config
