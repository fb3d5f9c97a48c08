"""Tokenizers: char (vocabulary from the corpus), byte (256) and locally trained byte-level BPE.

All three save to `directory/tokenizer.json` (one JSON text: `to_json` / `from_json`) so a run can resume (and
sample) without the corpus, and the prepare step's worker processes get the tokenizer as that text.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
from etils import epath

from effjax.errors import EffjaxError

KINDS = ('char', 'byte', 'bpe')
FILENAME = 'tokenizer.json'
_CHUNK = 1 << 20  # characters per BPE encode chunk
_BOUNDARY = re.compile(r'\n(?=\S)')  # always a byte-level pre-token boundary


def count_bytes(text: str) -> int:
  """UTF-8 length: the denominator of bits-per-byte."""
  return len(text.encode('utf-8'))


def _atomic_write(path: str, content: str) -> None:
  from effjax import paths  # pylint: disable=import-outside-toplevel  (local or gs://)

  paths.write_text_atomic(path, content)


def _chunks(text: str) -> list[str]:
  """Split at newline->non-space boundaries, which byte-level BPE never merges across, so chunked encoding
  equals whole-text encoding while letting `tokenizers` use its threads."""
  out, start = [], 0
  while len(text) - start > _CHUNK:
    m = _BOUNDARY.search(text, start + _CHUNK)
    if m is None:
      break
    out.append(text[start : m.end()])
    start = m.end()
  out.append(text[start:])
  return out


class Tokenizer:
  """Common interface: kind, vocab_size, encode, decode, save."""

  kind: str

  @property
  def vocab_size(self) -> int:
    raise NotImplementedError

  def encode(self, text: str) -> np.ndarray:
    raise NotImplementedError

  def encode_many(self, texts: list[str]) -> np.ndarray:
    """The concatenated ids of `texts` (the prepare step's unit of work)."""
    return self.encode(''.join(texts))

  def decode(self, ids) -> str:
    raise NotImplementedError

  def to_json(self) -> str:
    raise NotImplementedError

  def save(self, directory) -> None:
    _atomic_write(os.fspath(epath.Path(directory) / FILENAME), self.to_json())


class CharTokenizer(Tokenizer):
  """One id per character seen in training; id 0 is "unknown" (decodes to U+FFFD)."""

  kind = 'char'

  def __init__(self, chars: str):
    self.chars = ''.join(sorted(set(chars) - {'\x00'}))
    self._codes = np.array([ord(c) for c in self.chars], dtype=np.uint32)
    self._table = np.array(['\ufffd'] + list(self.chars), dtype=object)

  @classmethod
  def from_text(cls, text: str) -> 'CharTokenizer':
    return cls(''.join(set(text)))

  @property
  def vocab_size(self) -> int:
    return len(self.chars) + 1

  def encode(self, text: str) -> np.ndarray:
    cps = np.frombuffer(text.encode('utf-32-le'), dtype=np.uint32)
    if not len(self._codes):
      return np.zeros(len(cps), np.int32)
    idx = np.minimum(np.searchsorted(self._codes, cps), len(self._codes) - 1)
    return np.where(self._codes[idx] == cps, idx + 1, 0).astype(np.int32)

  def decode(self, ids) -> str:
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    ids = np.where((ids >= 0) & (ids < self.vocab_size), ids, 0)
    return ''.join(self._table[ids])

  def to_json(self) -> str:
    return json.dumps({'effjax_kind': 'char', 'chars': self.chars})


class ByteTokenizer(Tokenizer):
  """The 256 UTF-8 byte values; invalid sequences decode to U+FFFD."""

  kind = 'byte'

  @property
  def vocab_size(self) -> int:
    return 256

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode('utf-8'), dtype=np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    return bytes(np.clip(ids, 0, 255).astype(np.uint8)).decode('utf-8', errors='replace')

  def to_json(self) -> str:
    return json.dumps({'effjax_kind': 'byte'})


class BpeTokenizer(Tokenizer):
  """Byte-level BPE from the `tokenizers` package; round-trips any text exactly."""

  kind = 'bpe'

  def __init__(self, tok):
    self.tok = tok

  @classmethod
  def train(cls, texts, vocab_size: int) -> 'BpeTokenizer':
    """Learn the merges from `texts` (a string or a list of strings)."""
    from tokenizers import Tokenizer as HfTokenizer, decoders, models, pre_tokenizers, trainers

    tok = HfTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
      vocab_size=vocab_size,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      special_tokens=[],
      show_progress=False,
    )
    texts = [texts] if isinstance(texts, str) else texts
    tok.train_from_iterator((c for t in texts for c in _chunks(t)), trainer=trainer)
    return cls(tok)

  @property
  def vocab_size(self) -> int:
    return self.tok.get_vocab_size()

  def encode(self, text: str) -> np.ndarray:
    return self.encode_many([text])

  def encode_many(self, texts: list[str]) -> np.ndarray:
    encs = self._encode_batch([c for t in texts for c in _chunks(t)], add_special_tokens=False)
    return np.concatenate([np.asarray(e.ids, dtype=np.int32) for e in encs] or [np.zeros(0, np.int32)])

  @property
  def _encode_batch(self):
    # encode_batch_fast (tokenizers >= 0.21) skips the character offsets nobody here reads.
    return getattr(self.tok, 'encode_batch_fast', self.tok.encode_batch)

  def decode(self, ids) -> str:
    return self.tok.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=False)

  def to_json(self) -> str:
    return self.tok.to_str()


def learn(kind: str, texts: list[str], bpe_vocab_size: int | None = None) -> Tokenizer:
  """Make a tokenizer of `kind`; char and bpe learn their vocabulary from `texts` (training text only)."""
  if kind == 'char':
    return CharTokenizer(''.join(set().union(*map(set, texts))))
  if kind == 'byte':
    return ByteTokenizer()
  if kind == 'bpe':
    size = int(bpe_vocab_size or 0)
    if size < 257:
      raise EffjaxError(f'data.bpe_vocab_size={size} must be at least 257 (256 byte symbols + merges)')
    return BpeTokenizer.train(texts, size)
  raise EffjaxError(f'unknown data.tokenizer={kind!r}; valid: {", ".join(map(repr, KINDS))}')


def build_tokenizer(data_config, train_text: str) -> Tokenizer:
  """The configured tokenizer, learned from `train_text`."""
  return learn(data_config.tokenizer, [train_text], data_config.get('bpe_vocab_size'))


def load_tokenizer(directory) -> Tokenizer:
  """Load what `Tokenizer.save(directory)` wrote (local or gs://)."""
  return load_tokenizer_file(epath.Path(directory) / FILENAME)


def load_tokenizer_file(path) -> Tokenizer:
  """A tokenizer.json: effjax's char/byte, or any `tokenizers` one (an export's, a prepared dataset's, HF's)."""
  path = epath.Path(path)
  try:
    content = path.read_text()
  except FileNotFoundError:
    raise EffjaxError(f'tokenizer file {str(path)!r} does not exist') from None
  except (OSError, ValueError) as e:
    raise EffjaxError(f'tokenizer file {str(path)!r} is unreadable or corrupt ({e})') from None
  return from_json(content, where=f'tokenizer file {str(path)!r}')


def from_json(content: str, where: str = 'the tokenizer') -> Tokenizer:
  """The tokenizer whose `to_json()` is `content`."""
  try:
    obj = json.loads(content)
  except ValueError as e:
    raise EffjaxError(f'{where} is unreadable or corrupt ({e})') from None
  kind = obj.get('effjax_kind') if isinstance(obj, dict) else None
  if kind == 'char' and isinstance(obj.get('chars'), str):
    return CharTokenizer(obj['chars'])
  if kind == 'byte':
    return ByteTokenizer()
  try:
    from tokenizers import Tokenizer as HfTokenizer

    return BpeTokenizer(HfTokenizer.from_str(content))
  except Exception as e:  # tokenizers raises a plain Exception on bad JSON
    raise EffjaxError(f'{where} is not a char/byte/bpe tokenizer ({e})') from None
