"""The prepare step: stream documents -> split -> tokenize on every core -> sharded dataset directory.

    python -m effjax.data.prepare --corpus='data/*.jsonl.zst' --out=gs://bucket/ds --tokenizer=bpe
    python -m effjax.main --config=configs/gpt.py --config.data.dataset=gs://bucket/ds ...

Memory does not grow with the corpus: documents are read one at a time (sources.py), a bounded number of ~1 MB
batches is in flight to the worker processes, and tokens go straight to the current shard file. Only the
tokenizer's learning sample (`tokenizer_sample_bytes` of training text, the first ones in corpus order) is held
at once. The manifest is written last, so an interrupted prepare leaves no dataset; the rerun deletes its
leftover shards and starts over. Small corpora (the embedded default) are prepared implicitly by the training
run, in-process, into its workdir.

The split is by document (a stable hash of the document's key: its relative path, path:line or path#block), so
the same document always lands in the same split on any machine, and a document never straddles the splits.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import sys
import time

import numpy as np
from etils import epath

from effjax.data import dataset, sources, tokenizers
from effjax.errors import EffjaxError

SEPARATOR = '\n\n'  # appended to every document: the model sees where one ends
BATCH_BYTES = 1 << 20  # text per work item
IN_PROCESS_BYTES = 16 << 20  # a corpus smaller than this is encoded in-process (no worker start-up)
DEFAULT_SHARD_TOKENS = 1 << 27  # 256 MB of uint16 per shard
NANOGPT_CHUNK = 1 << 24  # tokens copied at a time from a nanoGPT .bin
LOCK = '.prepare.lock'


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything that decides a dataset's tokens; stored in its manifest and compared on reuse."""

  corpus: str
  tokenizer: str = 'char'
  bpe_vocab_size: int | None = None  # None unless tokenizer == 'bpe'
  max_bytes: int = 0  # 0: the whole corpus; else about this many bytes of text, split by val_fraction
  val_fraction: float = 0.05
  text_field: str = 'text'  # JSONL field / Parquet column
  tokenizer_sample_bytes: int = 64 << 20  # training text the char/BPE vocabulary is learned from
  tokenizer_file: str = ''  # use this tokenizer.json instead of learning one (required for nanoGPT .bin)

  def check(self) -> None:
    if self.tokenizer not in tokenizers.KINDS:
      raise EffjaxError(f'unknown data.tokenizer={self.tokenizer!r}; valid: {", ".join(map(repr, tokenizers.KINDS))}')
    if not 0.0 < self.val_fraction < 1.0:
      raise EffjaxError(f'data.val_fraction={self.val_fraction} must be strictly between 0 and 1')
    if self.max_bytes < 0:
      raise EffjaxError(f'data.max_bytes={self.max_bytes} must be >= 0 (0 means no cap)')
    if self.tokenizer == 'bpe' and (self.bpe_vocab_size or 0) < 257:
      raise EffjaxError(f'data.bpe_vocab_size={self.bpe_vocab_size} must be at least 257 (256 byte symbols + merges)')
    if self.tokenizer_sample_bytes < 1:
      raise EffjaxError(f'tokenizer_sample_bytes={self.tokenizer_sample_bytes} must be positive')


def settings_from_config(data_config) -> Settings:
  kind = data_config.tokenizer
  return Settings(
    corpus=str(data_config.corpus).strip(),
    tokenizer=kind,
    bpe_vocab_size=int(data_config.bpe_vocab_size) if kind == 'bpe' else None,
    max_bytes=int(data_config.max_bytes),
    val_fraction=float(data_config.val_fraction),
    text_field=data_config.get('text_field', 'text'),
    tokenizer_sample_bytes=int(data_config.get('tokenizer_sample_bytes', Settings.tokenizer_sample_bytes)),
  )


def is_val(key: str, val_fraction: float) -> bool:
  """Stable by-document split: the same key always lands in the same split."""
  return int.from_bytes(hashlib.sha1(key.encode('utf-8')).digest()[:8], 'big') % 10000 < val_fraction * 10000


# ---------------------------------------------------------------- split


def _truncate(text: str, max_len_bytes: int) -> str:
  return text.encode('utf-8')[: max(0, int(max_len_bytes))].decode('utf-8', errors='ignore')


def assign_splits(docs, settings: Settings):
  """(split, doc) for each document, by hash. With max_bytes, each split takes documents until it holds its share
  (train 1 - val_fraction, val val_fraction of max_bytes; the document that crosses it is truncated) and reading
  stops when both are full. A corpus with no document of one split still gets both: the last training document
  (or the first validation one) changes sides, and a single document is split by characters."""
  vf, cap = settings.val_fraction, settings.max_bytes
  budget = {'train': cap * (1 - vf), 'val': cap * vf} if cap else None
  used = {'train': 0, 'val': 0}
  count = {'train': 0, 'val': 0}
  pending_train = first_val = None
  for doc in docs:
    split = 'val' if is_val(doc.key, vf) else 'train'
    if budget:
      if used[split] >= budget[split]:
        if all(used[s] >= budget[s] for s in used):
          break
        continue
      n = len(doc.text.encode('utf-8'))
      if used[split] + n > budget[split]:
        doc = sources.Doc(doc.key, _truncate(doc.text, budget[split] - used[split]))
        n = len(doc.text.encode('utf-8'))
        if not n:
          used[split] = budget[split]
          continue
      used[split] += n
    count[split] += 1
    if split == 'train':
      if pending_train is not None:
        yield 'train', pending_train
      pending_train = doc
      if first_val is not None:
        yield 'val', first_val
        first_val = None
    elif count['train'] == 0 and first_val is None:
      first_val = doc  # held while no training document exists
    else:
      yield 'val', doc
  if not count['train'] and not count['val']:
    raise EffjaxError(f'data.corpus={settings.corpus!r} is empty (no non-empty documents)')
  single = pending_train if not count['val'] else first_val if not count['train'] else None
  if count['train'] + count['val'] == 1:
    text = single.text
    if len(text) < 2:
      raise EffjaxError(f'data.corpus={settings.corpus!r} has only {len(text)} character(s); it cannot be split')
    cut = min(len(text) - 1, max(1, int(len(text) * (1 - vf))))
    yield 'train', sources.Doc(single.key + '#train', text[:cut])
    yield 'val', sources.Doc(single.key + '#val', text[cut:])
  elif not count['val']:
    yield 'val', pending_train
  elif not count['train']:
    yield 'train', first_val
  elif pending_train is not None:
    yield 'train', pending_train


# ---------------------------------------------------------------- encoding

_WORKER_TOKENIZER = None


def _init_worker(content: str) -> None:
  global _WORKER_TOKENIZER  # pylint: disable=global-statement
  os.environ['RAYON_NUM_THREADS'] = '1'  # one process per core already; BPE's own threads would oversubscribe
  _WORKER_TOKENIZER = tokenizers.from_json(content, where='the prepare worker')


def encode_batch(tok: tokenizers.Tokenizer, batch: list[tuple[str, str]], dtype) -> dict:
  """{split: (tokens, utf8_bytes, docs)} of a batch of (split, text); each text gets the separator appended."""
  out = {}
  for split in dataset.SPLITS:
    texts = [t + SEPARATOR for s, t in batch if s == split]
    if texts:
      ids = tok.encode_many(texts)
      out[split] = (ids.astype(dtype), sum(len(t.encode('utf-8')) for t in texts), len(texts))
  return out


def _encode_in_worker(batch, dtype):
  return encode_batch(_WORKER_TOKENIZER, batch, dtype)


def _batches(assigned):
  batch, size = [], 0
  for split, doc in assigned:
    batch.append((split, doc.text))
    size += len(doc.text)
    if size >= BATCH_BYTES:
      yield batch
      batch, size = [], 0
  if batch:
    yield batch


def encoded(tok: tokenizers.Tokenizer, batches, dtype, workers: int):
  """encode_batch of each batch, in order. The first IN_PROCESS_BYTES are encoded here; after that `workers`
  processes take over, with at most 2 batches per worker in flight (bounded memory)."""
  seen, pool, inflight = 0, None, collections.deque()
  try:
    for batch in batches:
      if pool is None and workers > 1 and seen >= IN_PROCESS_BYTES:
        pool = concurrent.futures.ProcessPoolExecutor(
          workers, mp_context=multiprocessing.get_context('spawn'), initializer=_init_worker, initargs=(tok.to_json(),)
        )
      seen += sum(len(t) for _, t in batch)
      if pool is None:
        yield encode_batch(tok, batch, dtype)
        continue
      inflight.append(pool.submit(_encode_in_worker, batch, dtype))
      if len(inflight) >= 2 * workers:
        yield inflight.popleft().result()
    while inflight:
      yield inflight.popleft().result()
  finally:
    if pool is not None:
      for f in inflight:
        f.cancel()
      pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------- the directory


def _lock(out: epath.Path):
  """A local prepare holds DIR/.prepare.lock (its pid); a lock whose process is gone (a killed prepare) is taken
  over. On gs:// the lock is the same object, created only if absent (effjax/locks.py states its rules)."""
  if not dataset.is_local(out):
    from effjax import locks  # pylint: disable=import-outside-toplevel

    return locks.ObjectLock(
      f'{os.fspath(out).rstrip("/")}/{LOCK}',
      f'the dataset {os.fspath(out)!r}',
      'wait for that prepare or use another directory',
    ).acquire()
  path = os.path.join(os.fspath(out), LOCK)
  for _ in range(2):
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
      os.write(fd, str(os.getpid()).encode())
      os.close(fd)
      return path
    except FileExistsError:
      try:
        with open(path, encoding='utf-8') as f:
          pid = int(f.read().strip() or 0)
        os.kill(pid, 0)
      except (ValueError, ProcessLookupError, FileNotFoundError):
        os.unlink(path) if os.path.exists(path) else None
        continue
      except PermissionError:
        pass
      raise EffjaxError(
        f'another prepare (pid {pid}) is writing the dataset {os.fspath(out)!r}; wait for it or use another directory'
      ) from None
  raise EffjaxError(f'cannot take the prepare lock {path!r}')


def _clear_leftovers(out: epath.Path) -> None:
  """Shards and tokenizer of an interrupted prepare (no manifest): removed so the restart starts clean."""
  if not out.exists():  # a gs:// prefix with no objects yet (object stores have no empty directories)
    return
  for p in out.iterdir():
    name = p.name
    if (
      name == dataset.TOKENIZER
      or (name.endswith('.bin') and name.split('-')[0] in dataset.SPLITS)
      or name.startswith(f'.{dataset.MANIFEST}.tmp')
    ):
      p.unlink()


def check_reuse(manifest: dict, settings: Settings, where: str) -> None:
  built = manifest['settings']
  for k, want in dataclasses.asdict(settings).items():
    if built.get(k) != want:
      raise EffjaxError(
        f'the dataset in {where!r} was prepared with data.{k}={built.get(k)!r} but this asks for '
        f'data.{k}={want!r}; use another directory or the original setting'
      )


def prepare(
  settings: Settings, out_dir, *, workers: int = 0, shard_tokens: int = DEFAULT_SHARD_TOKENS, log=logging.info
) -> dict:
  """Prepare `settings.corpus` into `out_dir` (local or gs://) and return its manifest; an existing complete
  dataset with the same settings is reused as it is. workers=0: one per CPU core."""
  settings.check()
  from effjax import paths  # pylint: disable=import-outside-toplevel

  paths.check(out_dir, 'dataset directory')  # gs:// without the [gcs] extra: one line, not a traceback
  out = epath.Path(out_dir)
  existing = dataset.read_manifest(out)
  if existing is not None:
    check_reuse(existing, settings, str(out))
    dataset.check_shards(out, existing)
    return existing
  workers = workers or os.cpu_count() or 1
  nano = sources.nanogpt_dir(settings.corpus)
  files = None if nano is not None else sources.list_files(settings.corpus)  # a bad spec fails before any write
  out.mkdir(parents=True, exist_ok=True)
  lock = _lock(out)
  try:
    existing = dataset.read_manifest(out)  # another preparer may have finished while we waited
    if existing is not None:
      check_reuse(existing, settings, str(out))
      return existing
    _clear_leftovers(out)
    start = time.time()
    try:
      manifest = (
        _import_nanogpt(settings, nano, out, shard_tokens)
        if nano is not None
        else _prepare_text(settings, files, out, workers, shard_tokens)
      )
    except EffjaxError:  # bad data found midway: no half-written shards are left behind
      _clear_leftovers(out)
      raise
    manifest['seconds'] = round(time.time() - start, 3)
    dataset.write_text_atomic(out / dataset.MANIFEST, json.dumps(manifest, indent=1))
    log(
      'prepared %s: %d train / %d val tokens in %.1f s',
      out,
      manifest['splits']['train']['tokens'],
      manifest['splits']['val']['tokens'],
      manifest['seconds'],
    )
    return manifest
  finally:
    if lock is not None and not isinstance(lock, str):
      lock.release()
    elif lock is not None and os.path.exists(lock):
      os.unlink(lock)


def _learn_tokenizer(settings: Settings, sample_texts: list[str]) -> tokenizers.Tokenizer:
  if settings.tokenizer_file:
    return tokenizers.load_tokenizer_file(settings.tokenizer_file)
  return tokenizers.learn(settings.tokenizer, sample_texts + [SEPARATOR], settings.bpe_vocab_size)


def learn_tokenizer(settings: Settings, assigned):
  """(the tokenizer a prepare learns from the first tokenizer_sample_bytes of training text, the (split, doc)
  pairs read for it); `--mode=summary` uses it alone to know a char vocabulary without preparing anything."""
  buffered, sample_bytes = [], 0  # the documents read while the tokenizer's sample fills
  for split, doc in assigned:
    buffered.append((split, doc))
    if split == 'train':
      sample_bytes += len(doc.text)
      if sample_bytes >= settings.tokenizer_sample_bytes:
        break
  return _learn_tokenizer(settings, [d.text for s, d in buffered if s == 'train']), buffered


def _prepare_text(settings: Settings, files, out: epath.Path, workers: int, shard_tokens: int) -> dict:
  assigned = assign_splits(sources.documents(files, settings.text_field), settings)
  tok, buffered = learn_tokenizer(settings, assigned)
  dtype = dataset.token_dtype(tok.vocab_size)
  tok_content = tok.to_json()
  (out / dataset.TOKENIZER).write_text(tok_content)
  writers = {s: dataset.ShardWriter(out, s, dtype, shard_tokens) for s in dataset.SPLITS}
  stats = {s: {'bytes': 0, 'docs': 0} for s in dataset.SPLITS}

  def drained():  # the sample's documents, released as they are encoded
    queue = collections.deque(buffered)
    buffered.clear()
    while queue:
      yield queue.popleft()

  counts = np.zeros(tok.vocab_size, np.int64)  # how often each id occurs in the training split
  for result in encoded(tok, _batches(itertools.chain(drained(), assigned)), dtype, workers):
    for split, (ids, nbytes, ndocs) in result.items():
      writers[split].write(ids)
      stats[split]['bytes'] += nbytes
      stats[split]['docs'] += ndocs
      if split == 'train' and len(ids):
        counts += np.bincount(ids, minlength=tok.vocab_size)[: tok.vocab_size]
  check_has_text(settings, tok, counts)
  splits = {s: dict(shards=writers[s].finish(), tokens=writers[s].total, **stats[s]) for s in dataset.SPLITS}
  return _manifest(settings, tok, tok_content, dtype, splits, source_files=len(files))


def check_has_text(settings: Settings, tok: tokenizers.Tokenizer, counts: np.ndarray) -> None:
  """A corpus whose training tokens are (besides NUL bytes, unknown characters and the document separator) fewer
  than two distinct ids has nothing to learn: a model would reach loss 0 predicting the one id. That is a binary
  or empty input, refused before the dataset is complete."""
  filler = set(tok.encode(SEPARATOR).tolist()) | set(tok.encode('\x00').tolist())
  if tok.kind == 'char':
    filler.add(0)  # "unknown"
  content = [i for i in np.flatnonzero(counts).tolist() if i not in filler]
  if len(content) < 2:
    raise EffjaxError(
      f'data.corpus={settings.corpus!r} holds no text to learn from: its {int(counts.sum())} '
      f'training tokens use {len(content)} distinct {tok.kind} token(s) besides NUL bytes and the '
      f'document separator (binary files or all NUL bytes?); give a text corpus'
    )


def _import_nanogpt(settings: Settings, src: epath.Path, out: epath.Path, shard_tokens: int) -> dict:
  """nanoGPT's train.bin / val.bin (uint16 ids, already tokenized) become the shards as they are; the tokenizer
  that made them must be given (tokenizer_file), since the .bin files do not say."""
  if not settings.tokenizer_file:
    raise EffjaxError(
      f'{str(src)!r} holds nanoGPT train.bin/val.bin (already tokenized); give the tokenizer.json '
      f'that made them (--tokenizer_file=PATH)'
    )
  tok = tokenizers.load_tokenizer_file(settings.tokenizer_file)
  tok_content = tok.to_json()
  (out / dataset.TOKENIZER).write_text(tok_content)
  dtype = dataset.token_dtype(tok.vocab_size)
  splits = {}
  for split, name in zip(dataset.SPLITS, sources.NANOGPT_FILES):
    writer = dataset.ShardWriter(out, split, dtype, shard_tokens)
    path = src / name
    size = path.stat().length if hasattr(path.stat(), 'length') else os.path.getsize(os.fspath(path))
    if size % 2:
      raise EffjaxError(f'nanoGPT file {str(path)!r} has an odd size ({size} bytes); it is not uint16 tokens')
    with path.open('rb') as f:
      while chunk := f.read(NANOGPT_CHUNK * 2):
        ids = np.frombuffer(chunk, dtype='<u2')
        if len(ids) and int(ids.max()) >= tok.vocab_size:
          raise EffjaxError(
            f'nanoGPT file {str(path)!r} holds token id {int(ids.max())} but the tokenizer '
            f'{settings.tokenizer_file!r} has only {tok.vocab_size} ids; give the tokenizer '
            f'that made it'
          )
        writer.write(ids)
    splits[split] = dict(shards=writer.finish(), tokens=writer.total, bytes=None, docs=None)
  return _manifest(settings, tok, tok_content, dtype, splits, source_files=2)


def _manifest(settings, tok, tok_content, dtype, splits, source_files) -> dict:
  tok_sha = hashlib.sha256(tok_content.encode('utf-8')).hexdigest()
  settings_dict = dataclasses.asdict(settings)
  shards = {s: splits[s]['shards'] for s in dataset.SPLITS}
  for s in dataset.SPLITS:
    if not splits[s]['tokens']:
      raise EffjaxError(f'data.corpus={settings.corpus!r} gave no {s} tokens')
  val = splits['val']
  return dict(
    format=dataset.FORMAT,
    fingerprint=dataset.fingerprint(settings_dict, tok_sha, shards),
    settings=settings_dict,
    tokenizer_kind=tok.kind,
    vocab_size=tok.vocab_size,
    tokenizer_sha256=tok_sha,
    dtype=np.dtype(dtype).name,
    separator=SEPARATOR,
    source_files=source_files,
    val_bytes_per_token=(val['bytes'] / val['tokens']) if val['bytes'] else None,
    splits=splits,
  )


# ---------------------------------------------------------------- command line


def main(argv=None) -> int:
  import argparse  # pylint: disable=import-outside-toplevel

  p = argparse.ArgumentParser(prog='python -m effjax.data.prepare', description=__doc__.split('\n\n')[0])
  p.add_argument(
    '--corpus',
    required=True,
    help="'embedded', 'shakespeare', files / dirs / globs (comma-"
    'separated; .txt/.py/..., .jsonl[.gz|.zst], .parquet), or a nanoGPT dir with train.bin/val.bin',
  )
  p.add_argument('--out', required=True, help='dataset directory to write (local or gs://)')
  p.add_argument('--tokenizer', default='bpe', choices=tokenizers.KINDS)
  p.add_argument('--bpe_vocab_size', type=int, default=4096)
  p.add_argument('--max_bytes', type=int, default=0, help='0: the whole corpus')
  p.add_argument('--val_fraction', type=float, default=Settings.val_fraction)
  p.add_argument('--text_field', default='text', help='JSONL field / Parquet column holding the text')
  p.add_argument('--tokenizer_sample_bytes', type=int, default=Settings.tokenizer_sample_bytes)
  p.add_argument('--tokenizer_file', default='', help="reuse this tokenizer.json (a dataset's or an export's)")
  p.add_argument('--workers', type=int, default=0, help='tokenizer processes (0: one per core)')
  p.add_argument('--shard_tokens', type=int, default=DEFAULT_SHARD_TOKENS)
  a = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format='%(message)s')
  settings = Settings(
    corpus=a.corpus,
    tokenizer=a.tokenizer,
    bpe_vocab_size=a.bpe_vocab_size if a.tokenizer == 'bpe' else None,
    max_bytes=a.max_bytes,
    val_fraction=a.val_fraction,
    text_field=a.text_field,
    tokenizer_sample_bytes=a.tokenizer_sample_bytes,
    tokenizer_file=a.tokenizer_file,
  )
  try:
    m = prepare(settings, a.out, workers=a.workers, shard_tokens=a.shard_tokens)
  except EffjaxError as e:
    print(f'effjax: error: {e}', file=sys.stderr)
    return 2
  print(
    json.dumps(
      {
        'dataset': a.out,
        'fingerprint': m['fingerprint'],
        'train_tokens': m['splits']['train']['tokens'],
        'val_tokens': m['splits']['val']['tokens'],
        'seconds': m['seconds'],
      }
    )
  )
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
