"""Prepared datasets -> checkpointable grain batches.

A run reads a prepared dataset (effjax.data.dataset): `data.dataset=DIR` names one made by
`python -m effjax.data.prepare` (shared by any number of runs and hosts; nothing is tokenized by the run), or,
when it is empty, the run prepares `data.corpus` implicitly into its workdir (the embedded corpus: zero set-up).
Resuming never re-reads or re-tokenizes anything: the iterator state travels with the model checkpoint.
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np
from etils import epath

from effjax.data import dataset, tokenizers
from effjax.errors import EffjaxError


@dataclasses.dataclass
class DataBundle:
  tokenizer: tokenizers.Tokenizer
  train_tokens: dataset.Tokens
  val_tokens: dataset.Tokens
  fingerprint: str
  val_bytes_per_token: float
  identity: dict  # dataset.identity(): fingerprint, tokenizer sha256, vocab size, token counts
  directory: str


def _check_len(split: str, n: int, seq_len: int) -> None:
  if n < seq_len + 1:
    raise EffjaxError(
      f'the {split} split has {n} tokens but data.seq_len={seq_len} needs at least {seq_len + 1}; '
      f'use a larger corpus / data.max_bytes or a smaller data.seq_len'
    )


def open_dataset(directory, seq_len: int) -> DataBundle:
  """A prepared dataset, checked (manifest, every shard present at full size, enough tokens) but not loaded."""
  manifest = dataset.read_manifest(directory)
  if manifest is None:
    raise EffjaxError(
      f'data.dataset={str(directory)!r} holds no prepared dataset (no {dataset.MANIFEST}; a prepare '
      f'that did not finish leaves none); make it with: python -m effjax.data.prepare '
      f'--corpus=... --out={directory}'
    )
  dataset.check_shards(directory, manifest)
  for split in dataset.SPLITS:
    _check_len(split, manifest['splits'][split]['tokens'], seq_len)
  tok = tokenizers.load_tokenizer(directory)
  if tok.vocab_size != manifest['vocab_size']:
    raise EffjaxError(
      f'the tokenizer in {str(directory)!r} has {tok.vocab_size} ids but the manifest says '
      f'{manifest["vocab_size"]}: the dataset was overwritten; prepare it again'
    )
  bpt = manifest['val_bytes_per_token']
  if bpt is None:  # nanoGPT imports: the text's byte count is unknown, decode a sample of the validation split
    val = dataset.open_split(directory, manifest, 'val')
    sample = val[: min(len(val), 1 << 16)]
    bpt = tokenizers.count_bytes(tok.decode(sample)) / len(sample)
  return DataBundle(
    tok,
    dataset.open_split(directory, manifest, 'train'),
    dataset.open_split(directory, manifest, 'val'),
    manifest['fingerprint'],
    bpt,
    dataset.manifest_identity(manifest),
    str(directory),
  )


def dataset_dir(data_config, workdir: str) -> str:
  """Where a run's data lives: data.dataset, or the implicit one in its workdir."""
  return str(data_config.get('dataset', '') or '').strip() or str(epath.Path(workdir) / 'data')


def prepare_data(data_config, cache_dir) -> DataBundle:
  """The dataset in cache_dir, prepared from data.corpus first if there is none (the implicit path)."""
  from effjax.data import prepare  # pylint: disable=import-outside-toplevel  # (runnable as python -m)

  prepare.prepare(prepare.settings_from_config(data_config), cache_dir)
  return open_dataset(cache_dir, int(data_config.seq_len))


def load(data_config, workdir: str) -> DataBundle:
  """The run's data: the shared data.dataset as it is, or the workdir's own, prepared implicitly if needed."""
  if str(data_config.get('dataset', '') or '').strip():
    return open_dataset(data_config.dataset, int(data_config.seq_len))
  return prepare_data(data_config, dataset_dir(data_config, workdir))


def check_tokenizer(meta: dict, bundle: DataBundle, where: str) -> None:
  """A checkpoint trained on one tokenizer's ids must not resume on a dataset made with another."""
  want = (meta or {}).get('tokenizer_sha256')
  if want and want != bundle.identity['tokenizer_sha256']:
    raise EffjaxError(
      f'the checkpoints in {where} were trained with tokenizer {want[:12]} but the dataset '
      f'{bundle.directory!r} was made with tokenizer {bundle.identity["tokenizer_sha256"][:12]}; '
      f'use the dataset the run started with'
    )


def make_train_iterator(
  tokens: np.ndarray, *, seq_len: int, batch_size: int, seed: int, process_index: int = 0, process_count: int = 1
):
  """Endless, seeded, per-process-sharded batches of {"inputs", "targets"} (int32[b, seq_len]).

  The tokens are cut into non-overlapping chunks of seq_len; each epoch shuffles the chunks (reshuffled every
  epoch) and starts each window at a seeded random jitter inside its chunk. That global stream of windows does
  not depend on the number of processes: process p takes its elements p, p+n, p+2n, ... (n = process_count), so
  global batch k is the same set of windows on 1 process as on n (each process reads only its own windows), and
  a multi-process run gives the losses of a single-process run. A window is a slice view of `tokens` (a memmap
  is fine), copied only as seq_len+1 ints.
  """
  if batch_size % process_count:
    raise EffjaxError(f'batch_size={batch_size} is not divisible by the number of processes ({process_count})')
  n_tokens = len(tokens)
  num_chunks = (n_tokens - 1) // seq_len
  if num_chunks < 1:
    raise EffjaxError(
      f'{n_tokens} training tokens are too few for data.seq_len={seq_len} on {process_count} process(es)'
    )

  def window(chunk, rng):
    start = int(chunk) * seq_len
    start += int(rng.integers(0, min(seq_len - 1, n_tokens - seq_len - 1 - start) + 1))
    w = np.asarray(tokens[start : start + seq_len + 1], dtype=np.int32)
    return {'inputs': w[:-1], 'targets': w[1:]}

  # The window jitter is seeded by (seed, global element index): random_map comes before the per-process slice
  # and has an explicit seed (a default one would depend on the pipeline's depth).
  ds = (
    grain.MapDataset.range(num_chunks)
    .seed(seed)
    .shuffle()
    .repeat()
    .random_map(window, seed=seed)[process_index::process_count]
    .batch(batch_size // process_count, drop_remainder=True)
  )
  # One prefetch thread overlaps data with the (GIL-releasing) step without crowding small machines.
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)))


def check_ids(batch: dict, vocab_size: int, where: str) -> dict:
  """A token id outside the vocabulary would index past the embedding (NaN or garbage, reported as divergence);
  it means damaged shards, so it is one clear error instead. Costs one max() over the batch on the host."""
  top = int(max(batch['inputs'].max(), batch['targets'].max()))
  low = int(min(batch['inputs'].min(), batch['targets'].min()))
  if top >= vocab_size or low < 0:
    bad = top if top >= vocab_size else low
    raise EffjaxError(
      f'the dataset {where!r} holds token id {bad} but its tokenizer has {vocab_size} ids: '
      f'its shards are damaged or were written by another tokenizer; prepare it again'
    )
  return batch


def eval_batches(tokens, *, seq_len: int, batch_size: int, max_batches: int) -> list[dict]:
  """Deterministic non-overlapping windows spread evenly over the whole of `tokens` (so a few batches sample every
  part of the validation split, not just its first documents): as many full batches as fit (at most
  max_batches), or one smaller batch if fewer than batch_size windows exist."""
  n = (len(tokens) - 1) // seq_len
  if n < 1:
    raise EffjaxError(f'the validation split has {len(tokens)} tokens, fewer than data.seq_len+1={seq_len + 1}')
  sizes = [batch_size] * min(max(1, max_batches), n // batch_size) or [n]
  chunks = np.arange(sum(sizes)) * n // sum(sizes)  # evenly spaced chunk indices, each used once
  windows = np.stack([np.asarray(tokens[c * seq_len : c * seq_len + seq_len + 1], dtype=np.int32) for c in chunks])
  out, pos = [], 0
  for b in sizes:
    w = windows[pos : pos + b]
    out.append({'inputs': w[:, :-1], 'targets': w[:, 1:]})
    pos += b
  return out
