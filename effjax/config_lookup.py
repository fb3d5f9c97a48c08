"""Where a run's config comes from, so `--config` works from any directory.

`--config` takes a built-in variant by name (`pgpt`, `pgpt:tiny`: the installed effjax/configs/pgpt.py), a config
file anywhere on disk (`path/to/mine.py[:preset]`; it may build on `from effjax.configs import base`), or, with no
`--config`, a run directory's own `config.json` (`--workdir=DIR --mode=sample|eval|export|summary|config`). Each
becomes a file path that ml_collections' config_flags loads, so `--config.a.b=value` overrides apply to all three.
This file is itself such a config file: `get_config(workdir)` reads `workdir/config.json`.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil
import re

from effjax.errors import EffjaxError

CONFIG_JSON = 'config.json'


def builtin_dir() -> str:
  import effjax.configs  # pylint: disable=import-outside-toplevel

  return os.path.dirname(effjax.configs.__file__)


def variants() -> list[str]:
  """The built-in variants: the modules of effjax/configs that define get_config(preset)."""
  names = []
  for info in pkgutil.iter_modules([builtin_dir()]):
    if not info.name.startswith('_') and hasattr(_builtin_module(info.name), 'get_config'):
      names.append(info.name)
  return sorted(names)


def _builtin_module(name: str):
  return importlib.import_module(f'effjax.configs.{name}')


def resolve(spec: str) -> str:
  """A --config value as PATH[:PRESET] for config_flags: an existing file stays as given, a variant name becomes
  the installed module's path; anything else is one line naming what would be valid."""
  path, sep, preset = spec.partition(':')
  if os.path.isfile(path):
    return spec
  known = variants()
  if path in known:
    return os.path.join(builtin_dir(), f'{path}.py') + sep + preset
  name = os.path.splitext(os.path.basename(path))[0]
  hint = (
    f'; the built-in variant is --config={name}{sep}{preset}'
    if name in known
    else f'; built-in variants: {", ".join(known)} (e.g. --config=gpt:tiny; `effjax --list` shows their presets)'
  )
  raise EffjaxError(f'--config={spec}: there is no file {path!r} (from {os.getcwd()}){hint}')


def workdir_spec(workdir: str) -> str:
  """The --config value that loads `workdir/config.json` (this file's get_config)."""
  from effjax import paths  # pylint: disable=import-outside-toplevel

  paths.check(workdir, '--workdir')
  if not paths.isfile(paths.join(workdir, CONFIG_JSON)):
    raise EffjaxError(
      f'--workdir={workdir} has no {CONFIG_JSON} (no run was trained there); pass '
      '--config=VARIANT[:PRESET] or a config file'
    )
  return f'{os.path.abspath(__file__)}:{paths.abspath(workdir)}'


def is_workdir_spec(filename: str) -> bool:
  return filename.partition(':')[0] == os.path.abspath(__file__)


def get_config(workdir: str):
  """The resolved config a run wrote (older layouts migrated, new keys at their defaults)."""
  from effjax import checkpoint  # pylint: disable=import-outside-toplevel

  try:
    return checkpoint._export_config(workdir)  # pylint: disable=protected-access
  except EffjaxError as e:
    raise EffjaxError(str(e).replace('export config', 'run config', 1)) from None


def check_architecture(config, workdir: str) -> None:
  """Overrides on top of a run's own config may change how it runs, never the parameters it was trained with."""
  from effjax import checkpoint  # pylint: disable=import-outside-toplevel

  saved, wanted = checkpoint.architecture(get_config(workdir).model), checkpoint.architecture(config.model)
  diffs = [
    f'model.{k}={wanted.get(k)!r} (the run has {saved.get(k)!r})'
    for k in sorted(set(saved) | set(wanted))
    if saved.get(k) != wanted.get(k)
  ]
  if diffs:
    raise EffjaxError(
      f'{", ".join(diffs)} conflicts with the architecture of the run in {workdir}; its '
      'checkpoints have that shape (leave the override out, or train a new run)'
    )


# ----------------------------------------------------------------------------------------------------------
# What the variants are for: read from each module's docstring, whose `Presets:` block lists `name  purpose`.

_PRESET_LINE = re.compile(r'^  (\(default\)|\w+(?:\s*/\s*\w+)*)\s{2,}(\S.*)$')


def purpose(doc: str) -> str:
  """The first clause of a docstring (up to '.' or ';' outside brackets)."""
  text, depth = ' '.join(doc.split('\n\n')[0].split()), 0
  for i, ch in enumerate(text):
    if ch in '([':
      depth += 1
    elif ch in ')]':
      depth -= 1
    elif depth == 0 and ch in '.;' and (i + 1 == len(text) or text[i + 1] == ' '):
      return text[:i]
  return text


def presets(doc: str) -> dict[str, str]:
  """preset name ('' = the default) -> its purpose, from the docstring's `Presets:` block (an entry may continue
  on more deeply indented lines; `a / b  text` names several presets)."""
  found, names, inside = {}, [], False
  for line in doc.splitlines():
    if line.strip() == 'Presets:':
      inside = True
      continue
    if not inside:
      continue
    if line and not line.startswith(' '):
      break
    match = _PRESET_LINE.match(line)
    if match:
      names = ['' if n.strip() == '(default)' else n.strip() for n in match.group(1).split('/')]
      for name in names:
        found[name] = match.group(2).strip()
    elif line.startswith('   ') and names:
      for name in names:
        found[name] += ' ' + line.strip()
    else:
      names = []
  return found


def one_line(text: str, limit: int = 100) -> str:
  text = purpose(text)
  return text if len(text) <= limit else text[: text.rfind(' ', 0, limit - 1)] + ' …'


def describe_variants() -> str:
  lines = []
  for name in variants():
    doc = _builtin_module(name).__doc__ or ''
    lines.append(f'{name}: {one_line(doc)}')
    table = presets(doc)
    width = max(map(len, (f'{name}:{p}' if p else name for p in table)), default=0)
    for preset, text in table.items():
      lines.append(f'  --config={f"{name}:{preset}" if preset else name:<{width}}  {one_line(text)}')
  return '\n'.join(lines)


# ----------------------------------------------------------------------------------------------------------
# Where each resolved value came from.


def _flat(tree: dict, prefix: str = '') -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def _load_file_config(spec: str):
  path, _, preset = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('_effjax_config_origin', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(), (module.get_config(preset) if preset else None)


def origins(config, filename: str, overrides) -> dict:
  """flattened key -> (value, where it came from): 'override' (--config.KEY), 'workdir' (DIR/config.json),
  'preset' (the preset changed the variant's default) or 'default'."""
  flat = _flat(config.to_dict())
  if is_workdir_spec(filename):
    base = {k: 'workdir' for k in flat}
  else:
    default, chosen = _load_file_config(filename)
    default = _flat(default.to_dict())
    chosen = _flat(chosen.to_dict()) if chosen is not None else default
    base = {k: 'preset' if k not in default or default[k] != chosen.get(k) else 'default' for k in flat}
  for key in overrides:
    base[key] = 'override'
  return {k: (v, base[k]) for k, v in flat.items()}


def format_origins(table: dict) -> str:
  width = max(map(len, table), default=0)
  return '\n'.join(f'{key:<{width}}  {value!r:<24}  {where}' for key, (value, where) in table.items())
