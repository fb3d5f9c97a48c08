"""One path layer for everything a run reads or writes: local paths and `gs://` URLs alike, through etils.epath
(the library Orbax itself uses; for gs:// it goes through gcsfs, the `[gcs]` extra).

Object stores differ from a disk in three ways that the callers rely on, so they are stated here:
- there are no directories: a "directory" exists once an object exists under its prefix; `makedirs` is a no-op;
- there is no rename: an object appears whole when its upload completes (so a single write is already atomic),
  and a "move" is copy + delete (`move_tree`);
- there is no append and no flock: metrics.jsonl is rewritten whole (effjax/metrics.py) and the workdir lock is a
  conditional create (effjax/locks.py).
Listings are not cached (gcsfs would otherwise keep listings that Orbax's tensorstore writes, which bypass gcsfs,
make stale).
"""

from __future__ import annotations

import os
import shutil

from etils import epath

from effjax.errors import EffjaxError

GCS_EXTRA = "pip install 'effjax[gcs]'"


def is_remote(path) -> bool:
  return '://' in os.fspath(path)


def scheme(path) -> str:
  return os.fspath(path).split('://', 1)[0] if is_remote(path) else ''


def check(path, what: str = 'path') -> None:
  """A remote path needs its filesystem package; say which extra in one line, before anything is written."""
  if not is_remote(path):
    return
  s = scheme(path)
  if s != 'gs':
    raise EffjaxError(f'{what} {os.fspath(path)!r}: {s}:// is not supported; use a local path or gs://BUCKET/...')
  try:
    import gcsfs  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    import google.cloud.storage  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    raise EffjaxError(
      f'{what} {os.fspath(path)!r} is on gs://, which needs gcsfs and google-cloud-storage: {GCS_EXTRA}'
    ) from None
  _configure_gcsfs()


_CONFIGURED = False


def _configure_gcsfs() -> None:
  global _CONFIGURED  # pylint: disable=global-statement
  if _CONFIGURED:
    return
  import fsspec  # pylint: disable=import-outside-toplevel

  for protocol in ('gs', 'gcs'):
    fsspec.config.conf.setdefault(protocol, {}).setdefault('use_listings_cache', False)
  _CONFIGURED = True


def path(p) -> epath.Path:
  return epath.Path(p)


def join(base, *parts) -> str:
  if is_remote(base):
    return os.fspath(epath.Path(base).joinpath(*parts))
  return os.path.join(os.fspath(base), *parts)


def abspath(p) -> str:
  """Local paths made absolute; a URL as it is (without a trailing slash)."""
  p = os.fspath(p)
  return p.rstrip('/') if is_remote(p) else os.path.abspath(p)


def exists(p) -> bool:
  return epath.Path(p).exists() if is_remote(p) else os.path.exists(p)


def isdir(p) -> bool:
  return epath.Path(p).is_dir() if is_remote(p) else os.path.isdir(p)


def isfile(p) -> bool:
  if not is_remote(p):
    return os.path.isfile(p)
  q = epath.Path(p)
  return q.exists() and not q.is_dir()


def listdir(p) -> list[str]:
  if is_remote(p):
    return sorted(c.name for c in epath.Path(p).iterdir())
  return sorted(os.listdir(p))


def makedirs(p) -> None:
  if is_remote(p):
    return  # prefixes need no creating
  os.makedirs(p, exist_ok=True)


def open_file(p, mode: str = 'r'):
  """A file object for reading or writing (text modes are UTF-8)."""
  if is_remote(p):
    return epath.Path(p).open(mode)
  return open(p, mode, encoding=None if 'b' in mode else 'utf-8')  # pylint: disable=unspecified-encoding


def read_text(p) -> str:
  with open_file(p, 'r') as f:
    return f.read()


def read_bytes(p) -> bytes:
  with open_file(p, 'rb') as f:
    return f.read()


def write_text_atomic(p, text: str) -> None:
  """Readers never see a half-written file: locally a temporary sibling renamed into place; on an object store
  the upload itself (an object appears whole when its upload completes)."""
  if is_remote(p):
    epath.Path(p).write_text(text)
    return
  tmp = f'{p}.tmp{os.getpid()}'
  with open(tmp, 'w', encoding='utf-8') as f:
    f.write(text)
  os.replace(tmp, p)


def copy_file(src, dst) -> None:
  if not is_remote(src) and not is_remote(dst):
    shutil.copyfile(src, dst)
    return
  with open_file(src, 'rb') as f_in, open_file(dst, 'wb') as f_out:
    shutil.copyfileobj(f_in, f_out, 1 << 20)


def remove(p) -> None:
  if is_remote(p):
    epath.Path(p).unlink()
  else:
    os.remove(p)


def rmtree(p) -> None:
  """Removes a directory tree (or every object under a prefix); absent is fine."""
  if is_remote(p):
    if epath.Path(p).exists():
      epath.Path(p).rmtree()
  else:
    shutil.rmtree(p, ignore_errors=True)


def move_tree(src, dst) -> None:
  """Local: one rename. Object store: copy every object under src, then delete src (no rename exists; a crash
  in between leaves both copies, never neither)."""
  if not is_remote(src):
    os.rename(src, dst)
    return
  fs = _fs(src)
  s, d = _bare(src).rstrip('/'), _bare(dst).rstrip('/')
  for obj in fs.find(s):
    fs.copy(obj, d + obj[len(s) :])
  fs.rm(s, recursive=True)


def _fs(p):
  check(p)
  import fsspec  # pylint: disable=import-outside-toplevel

  return fsspec.filesystem(scheme(p))


def _bare(p) -> str:
  return os.fspath(p).split('://', 1)[1]


def glob(pattern: str) -> list[str]:
  if is_remote(pattern):
    proto = scheme(pattern)
    return [f'{proto}://{m}' for m in _fs(pattern).glob(_bare(pattern))]
  import glob as glob_lib  # pylint: disable=import-outside-toplevel

  return glob_lib.glob(pattern)
