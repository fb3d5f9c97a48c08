"""Data-preparation throughput: MB of text per second into a prepared dataset, for char, byte and BPE.

    python -m experiments.bench_data --mb=1024          # the recorded run (>= 1 GB; run it on an idle machine)
    python -m experiments.bench_data --mb=16            # a quick check that it works

Side by side, on the same corpus (JSONL files built from the Python sources on this machine, repeated up to --mb):
  prepare      `effjax.data.prepare.prepare` on the whole corpus (stream, split, learn the tokenizer from its
               sample, encode on every core, write shards + manifest): what a user gets, end to end.
  single-call  the path effjax had before the prepare step: the whole text as one string, encoded in one call
               (on the first --single_mb MB only: on the whole corpus it needs ~30x its size in memory).
  ceiling      `tokenizers`' own batch encoder (encode_batch_fast, all its threads) on --single_mb MB already in
               memory: no reading, splitting or writing; BPE only (char/byte have no `tokenizers` counterpart).
Writes experiments/results/bench_data.json and prints a markdown table. The corpus is deleted afterwards unless
--keep (it lives under --work, /tmp by default).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import sysconfig
import time

from effjax.data import prepare, sources, tokenizers

KINDS = ('char', 'byte', 'bpe')
FILE_MB = 64  # size of each JSONL file of the corpus


def python_sources() -> list[str]:
  """The .py files of the stdlib and site-packages (sorted, fixed)."""
  roots = [sysconfig.get_paths()['stdlib'], sysconfig.get_paths()['purelib']]
  out = []
  for root in roots:
    for dirpath, dirnames, filenames in os.walk(root):
      dirnames[:] = sorted(d for d in dirnames if not d.startswith('.') and d != '__pycache__')
      out += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith('.py')]
  return out


def build_corpus(directory: str, mb: int) -> int:
  """JSONL files ({"text": a source file}) totalling about `mb` MB of text; returns the text bytes written."""
  os.makedirs(directory, exist_ok=True)
  target, written, index, out = mb << 20, 0, 0, None
  files = python_sources()
  repeat = 0
  while written < target:
    for path in files:
      try:
        with open(path, encoding='utf-8') as f:
          text = f.read()
      except (OSError, UnicodeDecodeError):
        continue
      if not text:
        continue
      if out is None or out.tell() >= FILE_MB << 20:
        if out is not None:
          out.close()
        out = open(os.path.join(directory, f'part-{index:04d}.jsonl'), 'w', encoding='utf-8')
        index += 1
      # the repeat number keeps document keys (and so the split) distinct across repeats; the text is the file's
      out.write(json.dumps({'text': text, 'repeat': repeat}) + '\n')
      written += len(text.encode('utf-8'))
      if written >= target:
        break
    repeat += 1
  out.close()
  return written


def read_prefix(directory: str, mb: int) -> list[str]:
  docs, size = [], 0
  for doc in sources.documents(sources.list_files(directory), 'text'):
    docs.append(doc.text)
    size += len(doc.text.encode('utf-8'))
    if size >= mb << 20:
      break
  return docs


def timed(fn):
  start = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - start


def markdown(result: dict) -> str:
  lines = ['| tokenizer | path | MB | s | MB/s |', '|---|---|---:|---:|---:|']
  lines += [
    f'| {r["tokenizer"]} | {r["path"]} | {r["mb"]:.0f} | {r["seconds"]:.1f} | {r["mb_per_s"]:.2f} |'
    for r in result['rows']
  ]
  return '\n'.join(lines) + (
    f'\n\n`python -m experiments.bench_data {" ".join(result.get("argv", []))}`: '
    f'{result["cpus"]} CPUs, {result["workers"]} prepare workers.\n'
  )


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--mb', type=int, default=1024, help='corpus size in MB of text (>= 1024 for the recorded run)')
  p.add_argument('--single_mb', type=int, default=32, help='text for the single-call and ceiling rows')
  p.add_argument('--bpe_vocab_size', type=int, default=4096)
  p.add_argument('--workers', type=int, default=0, help='prepare worker processes (0: one per core)')
  p.add_argument('--kinds', default=','.join(KINDS))
  p.add_argument('--work', default='/tmp/effjax_bench_data')
  p.add_argument('--keep', action='store_true', help='keep the corpus and the datasets')
  p.add_argument(
    '--out', default=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results', 'bench_data.json')
  )
  a = p.parse_args(argv)
  kinds = [k for k in a.kinds.split(',') if k]
  corpus = os.path.join(a.work, 'corpus')
  shutil.rmtree(a.work, ignore_errors=True)
  try:
    nbytes, build_s = timed(lambda: build_corpus(corpus, a.mb))
    mb = nbytes / 2**20
    print(
      f'corpus: {mb:.0f} MB of text in {len(os.listdir(corpus))} JSONL files ({build_s:.0f} s to build)', flush=True
    )
    prefix = read_prefix(corpus, min(a.single_mb, a.mb))
    prefix_mb = sum(len(t.encode('utf-8')) for t in prefix) / 2**20
    rows = []
    for kind in kinds:
      vocab = a.bpe_vocab_size if kind == 'bpe' else None
      settings = prepare.Settings(corpus=corpus, tokenizer=kind, bpe_vocab_size=vocab)
      out_dir = os.path.join(a.work, f'ds-{kind}')
      manifest, secs = timed(lambda: prepare.prepare(settings, out_dir, workers=a.workers, log=lambda *_: None))
      tokens = manifest['splits']['train']['tokens'] + manifest['splits']['val']['tokens']
      rows.append(dict(tokenizer=kind, path='prepare', mb=mb, seconds=secs, mb_per_s=mb / secs, tokens=tokens))
      print(rows[-1], flush=True)
      tok = tokenizers.load_tokenizer(out_dir)
      whole = prepare.SEPARATOR.join(prefix)
      _, secs = timed(lambda: tok.encode(whole))
      rows.append(dict(tokenizer=kind, path='single-call', mb=prefix_mb, seconds=secs, mb_per_s=prefix_mb / secs))
      print(rows[-1], flush=True)
      whole = None  # the joined prefix is released before the next kind
      if kind == 'bpe':
        _, secs = timed(lambda: tok.tok.encode_batch_fast(prefix, add_special_tokens=False))
        rows.append(dict(tokenizer=kind, path='ceiling', mb=prefix_mb, seconds=secs, mb_per_s=prefix_mb / secs))
        print(rows[-1], flush=True)
      if not a.keep:
        shutil.rmtree(out_dir, ignore_errors=True)
    result = dict(
      rows=rows,
      corpus_mb=mb,
      cpus=os.cpu_count(),
      machine=platform.processor() or platform.machine(),
      workers=a.workers or os.cpu_count(),
      peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      argv=sys.argv[1:],
    )
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, 'w', encoding='utf-8') as f:
      json.dump(result, f, indent=1)
    with open(os.path.splitext(a.out)[0] + '.md', 'w', encoding='utf-8') as f:
      f.write(markdown(result))
    print(markdown(result))
    print(f'(results in {a.out})')
  finally:
    if not a.keep:
      shutil.rmtree(a.work, ignore_errors=True)
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
