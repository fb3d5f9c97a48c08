"""A prepared dataset on disk (local or gs://): flat token shards, an offsets index, the tokenizer, a manifest.

    DIR/manifest.json         written last: its presence is what makes DIR a dataset (the commit point)
    DIR/tokenizer.json        the tokenizer that made the tokens (effjax char/byte, or a `tokenizers` BPE)
    DIR/train-00000.bin ...   little-endian uint16 (vocab <= 65535) or uint32 token ids, documents back to back
    DIR/val-00000.bin ...     (each document followed by the separator's tokens)

The manifest holds the settings that made the dataset, each shard's token count and sha256 (the index: shard k
covers the global token offsets [offsets[k], offsets[k+1]) of its split), and the fingerprint that names the
dataset: a hash of the settings, the tokenizer and every shard's checksum.

Why flat shards rather than ArrayRecord records: training reads windows of seq_len+1 tokens at arbitrary token
offsets that cross document boundaries, so the unit of access is a token range, not a record. A flat shard gives
that range as one slice of an np.memmap (zero copy, nothing loaded that the step does not use; the page cache is
shared by every run on the host) or one ranged read on gs://; an ArrayRecord file would have to hold fixed windows
(tying the dataset to one seq_len) or documents (a window = several record reads plus concatenation). Flat shards
are also what nanoGPT's train.bin/val.bin already are, so those import without a copy of the format. grain still
does the sampling, shuffling, per-process sharding and checkpointable iteration over these windows.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
from etils import epath

from effjax.errors import EffjaxError

MANIFEST = 'manifest.json'
TOKENIZER = 'tokenizer.json'
FORMAT = 'effjax-tokens-v1'
SPLITS = ('train', 'val')


def shard_name(split: str, index: int) -> str:
  return f'{split}-{index:05d}.bin'


def token_dtype(vocab_size: int):
  return np.uint16 if vocab_size <= 65536 else np.uint32


def is_local(path) -> bool:
  return '://' not in str(path)


def write_text_atomic(path: epath.Path, text: str) -> None:
  """Readers never see a half-written file: local files are renamed into place; a gs:// object appears whole
  when its upload completes."""
  if not is_local(path):
    path.write_text(text)
    return
  tmp = path.parent / f'.{path.name}.tmp.{os.getpid()}'
  tmp.write_text(text)
  tmp.replace(path)


def fingerprint(settings: dict, tokenizer_sha: str, shards: dict) -> str:
  h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode('utf-8'))
  h.update(tokenizer_sha.encode('ascii'))
  for split in SPLITS:
    for s in shards[split]:
      h.update(f'{split}\0{s["name"]}\0{s["tokens"]}\0{s["sha256"]}\0'.encode('utf-8'))
  return h.hexdigest()


def read_manifest(directory) -> dict | None:
  """The manifest of a complete dataset in `directory`, or None if there is none (absent or half-written)."""
  path = epath.Path(directory) / MANIFEST
  if not path.exists():
    return None
  try:
    manifest = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise EffjaxError(
      f'dataset manifest {str(path)!r} is unreadable or corrupt ({e}); prepare the dataset '
      f'again into an empty directory'
    ) from None
  if not isinstance(manifest, dict) or manifest.get('format') != FORMAT:
    raise EffjaxError(f'{str(path)!r} is not an effjax dataset manifest (format {FORMAT!r})')
  return manifest


def identity(directory) -> dict:
  """What names a prepared dataset, for checks that a run resumes on the data it was trained on:
  {'fingerprint', 'tokenizer_sha256', 'vocab_size', 'train_tokens', 'val_tokens'}."""
  manifest = read_manifest(directory)
  if manifest is None:
    raise EffjaxError(f'{str(directory)!r} holds no prepared dataset (no {MANIFEST})')
  return manifest_identity(manifest)


def manifest_identity(manifest: dict) -> dict:
  return {
    'fingerprint': manifest['fingerprint'],
    'tokenizer_sha256': manifest['tokenizer_sha256'],
    'vocab_size': manifest['vocab_size'],
    'train_tokens': manifest['splits']['train']['tokens'],
    'val_tokens': manifest['splits']['val']['tokens'],
  }


class ShardWriter:
  """Appends token arrays to a split's shards, starting a new shard every `shard_tokens` tokens."""

  def __init__(self, directory: epath.Path, split: str, dtype, shard_tokens: int):
    self.directory, self.split, self.dtype, self.shard_tokens = directory, split, np.dtype(dtype), shard_tokens
    self.shards: list[dict] = []
    self.total = 0
    self._file = None
    self._hash = None
    self._count = 0

  def _open(self):
    name = shard_name(self.split, len(self.shards))
    self._file = (self.directory / name).open('wb')
    self._hash = hashlib.sha256()
    self._count = 0
    self.shards.append({'name': name, 'tokens': 0, 'sha256': ''})

  def _close(self):
    if self._file is not None:
      self._file.close()
      self.shards[-1].update(tokens=self._count, sha256=self._hash.hexdigest())
      self._file = None

  def write(self, tokens: np.ndarray) -> None:
    tokens = np.asarray(tokens).astype(self.dtype.newbyteorder('<'), copy=False)
    pos = 0
    while pos < len(tokens):
      if self._file is None:
        self._open()
      take = min(len(tokens) - pos, self.shard_tokens - self._count)
      data = tokens[pos : pos + take].tobytes()
      self._file.write(data)
      self._hash.update(data)
      self._count += take
      self.total += take
      pos += take
      if self._count == self.shard_tokens:
        self._close()

  def finish(self) -> list[dict]:
    self._close()
    return self.shards


class Tokens:
  """One split of a dataset as a read-only token array: len() and contiguous slices, across shard boundaries.

  Local shards are np.memmap'ed on first use (a slice reads only the pages it touches); remote ones are read
  with one ranged read per slice. Nothing is loaded into memory up front.
  """

  def __init__(self, directory, shards: list[dict], dtype):
    self.directory = epath.Path(directory)
    self.dtype = np.dtype(dtype).newbyteorder('<')
    self.names = [s['name'] for s in shards]
    self.offsets = np.concatenate([[0], np.cumsum([s['tokens'] for s in shards])]).astype(np.int64)
    self._maps = {}

  def __len__(self) -> int:
    return int(self.offsets[-1])

  @property
  def ndim(self) -> int:
    return 1

  def _shard(self, k: int):
    if k not in self._maps:
      path = self.directory / self.names[k]
      n = int(self.offsets[k + 1] - self.offsets[k])
      self._maps[k] = np.memmap(os.fspath(path), dtype=self.dtype, mode='r', shape=(n,)) if is_local(path) else path
    return self._maps[k]

  def _read(self, k: int, start: int, stop: int) -> np.ndarray:
    shard = self._shard(k)
    if isinstance(shard, np.memmap):
      return shard[start:stop]
    with shard.open('rb') as f:
      f.seek(start * self.dtype.itemsize)
      return np.frombuffer(f.read((stop - start) * self.dtype.itemsize), dtype=self.dtype)

  def __getitem__(self, index):
    if isinstance(index, (int, np.integer)):
      i = int(index) + (len(self) if index < 0 else 0)
      return self[i : i + 1][0]
    if not isinstance(index, slice) or index.step not in (None, 1):
      raise TypeError('Tokens supports integers and contiguous slices')
    start, stop, _ = index.indices(len(self))
    if stop <= start:
      return np.zeros(0, self.dtype)
    first = int(np.searchsorted(self.offsets, start, side='right')) - 1
    pieces, pos = [], start
    for k in range(first, len(self.names)):
      lo, hi = int(self.offsets[k]), int(self.offsets[k + 1])
      if pos >= stop:
        break
      if hi > pos:
        pieces.append(self._read(k, pos - lo, min(stop, hi) - lo))
        pos = min(stop, hi)
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

  def __array__(self, dtype=None, copy=None):
    out = self[:]
    return out.astype(dtype) if dtype is not None else np.asarray(out)


def check_shards(directory, manifest: dict) -> None:
  """Every shard the manifest names is there with its full size (cheap: one stat per shard)."""
  directory = epath.Path(directory)
  itemsize = np.dtype(manifest['dtype']).itemsize
  for split in SPLITS:
    for s in manifest['splits'][split]['shards']:
      path = directory / s['name']
      if not path.exists():
        raise EffjaxError(
          f'dataset {str(directory)!r} is missing shard {s["name"]!r} (the manifest lists '
          f'{len(manifest["splits"][split]["shards"])} {split} shards); prepare it again'
        )
      size, want = path.stat().length, s['tokens'] * itemsize
      if size != want:
        raise EffjaxError(
          f'dataset shard {str(path)!r} has {size} bytes but the manifest says {want} '
          f'({s["tokens"]} tokens): it is truncated or was overwritten; prepare the dataset again'
        )


def open_split(directory, manifest: dict, split: str) -> Tokens:
  return Tokens(directory, manifest['splits'][split]['shards'], manifest['dtype'])
