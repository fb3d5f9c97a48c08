"""Tokenize once into a cache, then serve batches with a checkpointable grain iterator.

Resuming never re-reads or re-tokenizes the corpus: the cache holds raw token arrays, the tokenizer and a
meta.json recording what they were built from, and the iterator state travels with the model checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os

import grain
import numpy as np

from effjax.data import corpora, tokenizers
from effjax.errors import EffjaxError

META = "meta.json"
# Settings that change the cached tokens: a cache built with other values must not be reused silently.
_CACHE_KEYS = ("corpus", "tokenizer", "bpe_vocab_size", "max_bytes", "val_fraction", "text_field")


@dataclasses.dataclass
class DataBundle:
  tokenizer: tokenizers.Tokenizer
  train_tokens: np.ndarray
  val_tokens: np.ndarray
  fingerprint: str
  val_bytes_per_token: float


def _spec(data_config) -> dict:
  spec = {k: data_config.get(k, "text" if k == "text_field" else None) for k in _CACHE_KEYS}
  if spec["tokenizer"] != "bpe":
    spec["bpe_vocab_size"] = None  # irrelevant for char/byte: changing it must not invalidate the cache
  return spec


def _check_len(split: str, n: int, seq_len: int) -> None:
  if n < seq_len + 1:
    raise EffjaxError(f"the {split} split has {n} tokens but data.seq_len={seq_len} needs at least {seq_len + 1}; "
                      f"use a larger corpus / data.max_bytes or a smaller data.seq_len")


def _write_bin(path: str, arr: np.ndarray) -> None:
  tmp = f"{path}.tmp.{os.getpid()}"
  arr.tofile(tmp)
  os.replace(tmp, path)


def prepare_data(data_config, cache_dir: str) -> DataBundle:
  """Load the token cache in cache_dir, or build it (corpus -> tokenizer -> tokens) if there is none.

  meta.json is written last, so its presence means the cache is complete.
  """
  seq_len = int(data_config.seq_len)
  spec = _spec(data_config)
  meta_path = os.path.join(cache_dir, META)
  if os.path.exists(meta_path):
    try:
      with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    except (OSError, ValueError) as e:
      raise EffjaxError(f"cache file {meta_path!r} is corrupt ({e}); delete {cache_dir!r} to rebuild it") from None
    built = meta.get("spec", {})
    for k, want in spec.items():
      if built.get(k) != want:
        raise EffjaxError(f"cached data in {cache_dir!r} was built with data.{k}={built.get(k)!r} but the "
                          f"config asks for data.{k}={want!r}; use a fresh workdir or the original setting")
    for split in ("train", "val"):
      _check_len(split, meta[f"{split}_len"], seq_len)
    tok = tokenizers.load_tokenizer(cache_dir)
    arrays = [np.memmap(os.path.join(cache_dir, f"{s}.bin"), dtype=meta["dtype"], mode="r", shape=(meta[f"{s}_len"],))
              for s in ("train", "val")]
    return DataBundle(tok, arrays[0], arrays[1], meta["fingerprint"], meta["val_bytes_per_token"])

  corpus = corpora.load_corpus(data_config)
  tok = tokenizers.build_tokenizer(data_config, corpus.train_text)
  dtype = np.uint16 if tok.vocab_size <= 65535 else np.uint32
  train = tok.encode(corpus.train_text).astype(dtype)
  val = tok.encode(corpus.val_text).astype(dtype)
  _check_len("train", len(train), seq_len)
  _check_len("val", len(val), seq_len)
  val_bpt = tokenizers.count_bytes(corpus.val_text) / len(val)

  os.makedirs(cache_dir, exist_ok=True)
  _write_bin(os.path.join(cache_dir, "train.bin"), train)
  _write_bin(os.path.join(cache_dir, "val.bin"), val)
  tok.save(cache_dir)
  meta = dict(spec=spec, corpus_name=corpus.name, tokenizer_kind=tok.kind, vocab_size=tok.vocab_size,
              dtype=np.dtype(dtype).name, train_len=len(train), val_len=len(val), fingerprint=corpus.fingerprint,
              val_bytes_per_token=val_bpt, num_train_docs=corpus.num_train_docs, num_val_docs=corpus.num_val_docs)
  tmp = f"{meta_path}.tmp.{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(meta, f, indent=1)
  os.replace(tmp, meta_path)
  return DataBundle(tok, train, val, corpus.fingerprint, val_bpt)


def make_train_iterator(tokens: np.ndarray, *, seq_len: int, batch_size: int, seed: int, process_index: int = 0,
                        process_count: int = 1):
  """Endless, seeded, per-process-sharded batches of {"inputs", "targets"} (int32[b, seq_len]).

  The tokens are cut into non-overlapping chunks of seq_len; each epoch shuffles the chunks (reshuffled every
  epoch) and starts each window at a seeded random jitter inside its chunk. That global stream of windows does
  not depend on the number of processes: process p takes its elements p, p+n, p+2n, ... (n = process_count), so
  global batch k is the same set of windows on 1 process as on n (each process reads only its own windows), and
  a multi-process run gives the losses of a single-process run. A window is a slice view of `tokens` (a memmap
  is fine), copied only as seq_len+1 ints.
  """
  if batch_size % process_count:
    raise EffjaxError(f"batch_size={batch_size} is not divisible by the number of processes ({process_count})")
  n_tokens = len(tokens)
  num_chunks = (n_tokens - 1) // seq_len
  if num_chunks < 1:
    raise EffjaxError(f"{n_tokens} training tokens are too few for data.seq_len={seq_len} on {process_count} "
                      f"process(es)")

  def window(chunk, rng):
    start = int(chunk) * seq_len
    start += int(rng.integers(0, min(seq_len - 1, n_tokens - seq_len - 1 - start) + 1))
    w = np.asarray(tokens[start:start + seq_len + 1], dtype=np.int32)
    return {"inputs": w[:-1], "targets": w[1:]}

  # The window jitter is seeded by (seed, global element index): random_map comes before the per-process slice
  # and has an explicit seed (a default one would depend on the pipeline's depth).
  ds = (grain.MapDataset.range(num_chunks).seed(seed).shuffle().repeat().random_map(window, seed=seed)
        [process_index::process_count].batch(batch_size // process_count, drop_remainder=True))
  # One prefetch thread overlaps data with the (GIL-releasing) step without crowding small machines.
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)))


def eval_batches(tokens: np.ndarray, *, seq_len: int, batch_size: int, max_batches: int) -> list[dict]:
  """Deterministic non-overlapping windows from the start of `tokens`: as many full batches as fit (at most
  max_batches), or one smaller batch if fewer than batch_size windows exist."""
  n = (len(tokens) - 1) // seq_len
  if n < 1:
    raise EffjaxError(f"the validation split has {len(tokens)} tokens, fewer than data.seq_len+1={seq_len + 1}")
  sizes = [batch_size] * min(max(1, max_batches), n // batch_size) or [n]
  out, pos = [], 0
  for b in sizes:
    w = np.asarray(tokens[pos:pos + b * seq_len + 1], dtype=np.int32)
    out.append({"inputs": w[:-1].reshape(b, seq_len), "targets": w[1:].reshape(b, seq_len)})
    pos += b * seq_len
  return out
