"""Data stack: sources, split, tokenizers, prepared datasets and grain iterators (small and CPU-fast)."""

import gzip
import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from effjax.data import dataset, pipeline, prepare, sources, tokenizers
from effjax.errors import EffjaxError

CODE = (
  'def f(x):\n\treturn x + 1  # café ☕ 日本語\n\n'
  'class A:\n    """Ünïcödé docstring — with “quotes”."""\n    y = [1, 2, 3]\r\n'
) * 3


def cfg(**kw):
  d = dict(
    corpus='embedded',
    tokenizer='char',
    bpe_vocab_size=300,
    seq_len=16,
    max_bytes=0,
    val_fraction=0.2,
    text_field='text',
  )
  d.update(kw)
  return ml_collections.ConfigDict(d)


def code_like(n):
  """Deterministic code-ish text with unicode, tabs and newlines."""
  rng = np.random.default_rng(0)
  names = ['alpha', 'beta', 'gamma', 'δelta', 'x', 'y_1', 'naïve', '数据']
  lines = []
  for i in range(n):
    a, b = rng.choice(names, 2)
    lines.append(f"def {a}_{i}({b}):\n\treturn {b} * {i} + len('{a}')  # ✓ note\n")
  return '\n'.join(lines)


# ---------------------------------------------------------------- tokenizers


@pytest.mark.parametrize('kind', ['char', 'byte', 'bpe'])
def test_round_trip_and_save_load(kind, tmp_path):
  train = code_like(200) + CODE
  tok = tokenizers.build_tokenizer(cfg(tokenizer=kind), train)
  assert tok.kind == kind
  for text in (CODE, train[:2000]):
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.ndim == 1
    assert ids.max() < tok.vocab_size
    assert tok.decode(ids) == text and tok.decode(list(ids)) == text
  if kind == 'bpe':
    assert 256 < tok.vocab_size <= 300
    assert len(tok.encode(train)) < 0.7 * tokenizers.count_bytes(train)  # merges were learned
  tok.save(str(tmp_path))
  tok2 = tokenizers.load_tokenizer(str(tmp_path))
  assert tok2.kind == kind and tok2.vocab_size == tok.vocab_size
  np.testing.assert_array_equal(tok2.encode(CODE), tok.encode(CODE))


def test_bpe_chunked_encoding_equals_whole(monkeypatch):
  tok = tokenizers.build_tokenizer(cfg(tokenizer='bpe'), code_like(200))
  text = code_like(300)
  whole = tok.encode(text)
  monkeypatch.setattr(tokenizers, '_CHUNK', 100)
  assert len(tokenizers._chunks(text)) > 10
  np.testing.assert_array_equal(tok.encode(text), whole)


def test_char_unknown_is_zero():
  tok = tokenizers.CharTokenizer.from_text('abc\x00')
  assert tok.vocab_size == 4  # a, b, c + unknown (NUL is not a vocabulary entry)
  np.testing.assert_array_equal(tok.encode('axb\x00'), [1, 0, 2, 0])
  assert tok.decode([1, 0, 3]) == 'a\ufffdc'
  assert tokenizers.count_bytes('é☕') == 5


def test_tokenizer_errors(tmp_path):
  with pytest.raises(EffjaxError, match="'wordpiece'"):
    tokenizers.build_tokenizer(cfg(tokenizer='wordpiece'), 'abc')
  with pytest.raises(EffjaxError, match='does not exist'):
    tokenizers.load_tokenizer(str(tmp_path))
  (tmp_path / 'tokenizer.json').write_text('{not json')
  with pytest.raises(EffjaxError, match='corrupt'):
    tokenizers.load_tokenizer(str(tmp_path))


# ---------------------------------------------------------------- sources and split


def settings(**kw):
  d = dict(corpus='embedded', tokenizer='char', max_bytes=0, val_fraction=0.2)
  d.update(kw)
  return prepare.Settings(**d)


def split_docs(**kw):
  s = settings(**kw)
  out = {'train': [], 'val': []}
  for split, doc in prepare.assign_splits(sources.documents(sources.list_files(s.corpus), s.text_field), s):
    out[split].append(doc)
  return out


def _write_files(tmp_path):
  d = tmp_path / 'src'
  (d / 'sub').mkdir(parents=True)
  docs = {f'{"sub/" if i >= 10 else ""}f{i}.py': f'# file {i}\n' + code_like(5 + i) for i in range(12)}
  for name, text in docs.items():
    (d / name).write_text(text, encoding='utf-8')
  (d / '.hidden').write_text('SECRET')
  return d, docs


def test_user_dir_split_by_document_hash(tmp_path):
  d, docs = _write_files(tmp_path)
  got = split_docs(corpus=str(d), val_fraction=0.3)
  keys = {s: {doc.key for doc in got[s]} for s in got}
  assert keys['train'] | keys['val'] == {f'src/{n}' for n in docs} and not keys['train'] & keys['val']
  for split in got:
    for doc in got[split]:
      assert prepare.is_val(doc.key, 0.3) == (split == 'val') and doc.text == docs[doc.key[4:]]
  assert keys['val'] and keys['train']


def test_cap_gives_each_split_its_share(tmp_path):
  d, docs = _write_files(tmp_path)
  got = split_docs(corpus=str(d), val_fraction=0.3, max_bytes=2000)
  n = {s: sum(len(x.text.encode()) for x in got[s]) for s in got}
  assert n == {'train': 1400, 'val': 600}  # (1 - val_fraction) and val_fraction of max_bytes, the crossing doc cut
  first = next(n for n in sorted(docs) if not prepare.is_val(f'src/{n}', 0.3))
  assert got['train'][0].text == docs[first]  # documents in corpus order


def test_single_document_split_by_characters(tmp_path):
  f = tmp_path / 'one.txt'
  f.write_text('abcdefghij' * 10)
  got = split_docs(corpus=str(f), val_fraction=0.1)
  assert [d.text for d in got['train']] == ['abcdefghij' * 9] and [d.text for d in got['val']] == ['abcdefghij']


def test_every_format_streams_the_same_documents(tmp_path, monkeypatch):
  import pyarrow as pa
  import pyarrow.parquet as pq
  import zstandard

  texts = [f'doc {i} ✓ ' + code_like(i % 7 + 1) for i in range(40)]
  lines = '\n'.join(json.dumps({'body': t, 'id': i}) for i, t in enumerate(texts)) + '\n\n'
  (tmp_path / 'a.jsonl').write_text(lines, encoding='utf-8')
  with gzip.open(tmp_path / 'b.jsonl.gz', 'wt', encoding='utf-8') as f:
    f.write(lines)
  (tmp_path / 'c.jsonl.zst').write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
  pq.write_table(pa.table({'body': texts, 'id': list(range(40))}), tmp_path / 'd.parquet', row_group_size=16)
  for name in ('a.jsonl', 'b.jsonl.gz', 'c.jsonl.zst', 'd.parquet'):
    f = sources.SourceFile(name, sources.epath.Path(tmp_path / name))
    assert [d.text for d in sources.read_docs(f, 'body')] == texts, name
  big = 'line ☕ 日本\n' * 3000  # ~45 KB: cut into ~8 KB blocks at newlines
  (tmp_path / 'big.txt').write_text(big, encoding='utf-8')
  monkeypatch.setattr(sources, 'TEXT_BLOCK', 8000)
  blocks = list(sources.read_docs(sources.SourceFile('big.txt', sources.epath.Path(tmp_path / 'big.txt')), 'text'))
  assert len(blocks) > 5 and ''.join(d.text for d in blocks) == big
  assert all(d.text.endswith('\n') and len(d.text.encode()) <= 8000 for d in blocks)
  assert [d.key for d in blocks[:2]] == ['big.txt#0', 'big.txt#1']
  # globs (recursive and not) and comma lists
  d, _ = _write_files(tmp_path)
  assert len(sources.list_files(f'{d}/*.py, {tmp_path}/a.jsonl')) == 11
  assert len(sources.list_files(f'{d}/**/*.py')) == 12


# ---------------------------------------------------------------- prepared datasets


def test_prepare_reuse_never_rereads_and_reads_windows_across_shards(tmp_path, monkeypatch):
  d, _ = _write_files(tmp_path)
  s = settings(corpus=str(d), tokenizer='bpe', bpe_vocab_size=300, val_fraction=0.3)
  out = tmp_path / 'ds'
  m = prepare.prepare(s, out, shard_tokens=700)
  assert len(m['splits']['train']['shards']) > 2  # several shards per split
  names = sorted(os.listdir(out))
  assert {'val-00000.bin', 'train-00002.bin', 'manifest.json', 'tokenizer.json'} <= set(names)
  a = pipeline.open_dataset(out, seq_len=16)
  assert a.identity == dataset.identity(out) and a.fingerprint == m['fingerprint']
  assert a.val_bytes_per_token > 1.0 and a.tokenizer.kind == 'bpe'
  whole = np.concatenate([np.fromfile(out / sh['name'], np.uint16) for sh in m['splits']['train']['shards']])
  assert len(a.train_tokens) == len(whole) == m['splits']['train']['tokens']
  for start, stop in ((0, 5), (690, 710), (650, 2150), (len(whole) - 3, len(whole))):
    np.testing.assert_array_equal(a.train_tokens[start:stop], whole[start:stop])
  assert isinstance(a.train_tokens._shard(0), np.memmap)  # mapped, not loaded
  text = a.tokenizer.decode(whole)
  assert '# file 1\n' in text and text.count(prepare.SEPARATOR) >= m['splits']['train']['docs']

  def boom(*_):
    raise AssertionError('corpus re-read')

  monkeypatch.setattr(sources, 'list_files', boom)
  assert prepare.prepare(s, out)['fingerprint'] == m['fingerprint']  # complete: reused as it is
  with pytest.raises(EffjaxError, match="prepared with data.tokenizer='bpe' but this asks for data.tokenizer='char'"):
    prepare.prepare(dataclasses_replace(s, tokenizer='char', bpe_vocab_size=None), out)


def dataclasses_replace(s, **kw):
  import dataclasses

  return dataclasses.replace(s, **kw)


def test_worker_processes_give_the_in_process_tokens(tmp_path, monkeypatch):
  d, _ = _write_files(tmp_path)
  for kind in ('bpe',):  # char and byte take the same worker path
    s = settings(corpus=str(d), tokenizer=kind, bpe_vocab_size=300)
    here = prepare.prepare(s, tmp_path / f'here-{kind}', workers=1)
    monkeypatch.setattr(prepare, 'IN_PROCESS_BYTES', 3000)  # the first docs here, the rest in 2 workers
    monkeypatch.setattr(prepare, 'BATCH_BYTES', 500)
    pool = prepare.prepare(s, tmp_path / f'pool-{kind}', workers=2, shard_tokens=1000)
    monkeypatch.undo()
    assert pool['fingerprint'] != here['fingerprint']  # other shard sizes ...
    for split in dataset.SPLITS:  # ... same tokens
      np.testing.assert_array_equal(
        dataset.open_split(tmp_path / f'pool-{kind}', pool, split)[:],
        dataset.open_split(tmp_path / f'here-{kind}', here, split)[:],
      )


def test_embedded_corpus_and_config_path(tmp_path):
  c = cfg(max_bytes=300_000, val_fraction=0.05)
  a = pipeline.prepare_data(c, tmp_path / 'a')
  b = pipeline.prepare_data(c, tmp_path / 'b')
  assert a.fingerprint == b.fingerprint and 300_000 < len(a.train_tokens) + len(a.val_tokens) < 301_000
  assert 14_000 < len(a.val_tokens) < 16_000  # about val_fraction of the bytes (plus separators)
  assert 'import' in a.tokenizer.decode(a.train_tokens[:20_000])
  assert pipeline.prepare_data(cfg(max_bytes=200_000, val_fraction=0.05), tmp_path / 'c').fingerprint != a.fingerprint
  sh = pipeline.prepare_data(cfg(corpus='shakespeare', max_bytes=100_000), tmp_path / 's')
  assert len(sh.val_tokens) > 1000
  c.dataset = str(tmp_path / 'a')
  assert pipeline.load(c, str(tmp_path / 'workdir')).fingerprint == a.fingerprint
  assert not (tmp_path / 'workdir').exists()  # a shared dataset is only read


def test_nanogpt_bins_import_as_they_are(tmp_path):
  tok = tokenizers.build_tokenizer(cfg(tokenizer='bpe'), code_like(100))
  src = tmp_path / 'nano'
  src.mkdir()
  train_ids, val_ids = tok.encode(code_like(50)).astype(np.uint16), tok.encode(code_like(9)).astype(np.uint16)
  train_ids.tofile(src / 'train.bin')
  val_ids.tofile(src / 'val.bin')
  with pytest.raises(EffjaxError, match='nanoGPT train.bin/val.bin.*--tokenizer_file'):
    prepare.prepare(settings(corpus=str(src)), tmp_path / 'ds')
  tok.save(str(tmp_path))
  prepare.prepare(settings(corpus=str(src), tokenizer_file=str(tmp_path / 'tokenizer.json')), tmp_path / 'ds')
  b = pipeline.open_dataset(tmp_path / 'ds', seq_len=16)
  np.testing.assert_array_equal(b.train_tokens[:], train_ids)
  np.testing.assert_array_equal(b.val_tokens[:], val_ids)
  assert 1.0 < b.val_bytes_per_token < 4.0


def test_prepare_cli(tmp_path, capsys):
  d, _ = _write_files(tmp_path)
  r = subprocess.run(
    [sys.executable, '-m', 'effjax.data.prepare', f'--corpus={d}', f'--out={tmp_path / "ds"}', '--tokenizer=byte'],
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert r.returncode == 0, r.stderr
  printed = json.loads(r.stdout.strip().splitlines()[-1])
  assert printed['fingerprint'] == dataset.identity(tmp_path / 'ds')['fingerprint']
  assert prepare.main([f'--corpus={tmp_path / "nothing"}', f'--out={tmp_path / "ds2"}']) == 2
  assert capsys.readouterr().err.strip().splitlines() == [
    f'effjax: error: data.corpus {str(tmp_path / "nothing")!r} is not a file, directory or matching glob; valid: '
    "'embedded', 'shakespeare', or paths/dirs/globs (comma-separated)"
  ]
  assert not (tmp_path / 'ds2').exists()


# ---------------------------------------------------------------- bad data: one clear line, nothing half-done


def _bad_gzip(p):
  with gzip.open(p / 'x.jsonl.gz', 'wt') as f:
    f.write('{"text": "ok"}\n' * 2000)
  raw = (p / 'x.jsonl.gz').read_bytes()
  (p / 'x.jsonl.gz').write_bytes(raw[: len(raw) // 2])
  return str(p / 'x.jsonl.gz'), {}


def _corrupt_zst(p):
  (p / 'x.jsonl.zst').write_bytes(b'\x28\xb5\x2f\xfd' + b'garbage' * 10)
  return str(p / 'x.jsonl.zst'), {}


def _parquet_without_column(p):
  import pyarrow as pa
  import pyarrow.parquet as pq

  pq.write_table(pa.table({'content': ['a', 'b']}), p / 'x.parquet')
  return str(p / 'x.parquet'), {}


def _jsonl_without_field(p):
  (p / 'x.jsonl').write_text('{"text": "ok"}\n{"content": "no text"}\n')
  return str(p / 'x.jsonl'), {}


def _latin1(p):
  (p / 'x.txt').write_bytes('caf\xe9'.encode('latin-1'))
  return str(p / 'x.txt'), {}


def _empty_dir(p):
  (p / 'e').mkdir()
  (p / 'e' / 'a.txt').write_text('')
  return str(p / 'e'), {}


def _nul_bytes(p):
  (p / 'zeros.txt').write_bytes(b'\0' * 5000)
  return str(p / 'zeros.txt'), {}


def _one_char(p):
  (p / 'a.txt').write_text('a' * 5000)
  return str(p / 'a.txt'), {}


BAD_SOURCES = {
  'corrupt gzip': (_bad_gzip, r"x\.jsonl\.gz' is corrupt or truncated"),
  'corrupt zstd': (_corrupt_zst, r"x\.jsonl\.zst' is corrupt or truncated"),
  'parquet without the column': (
    _parquet_without_column,
    r"x\.parquet' has no column data.text_field='text' "
    r"\(columns: \['content'\]\)",
  ),
  'jsonl without the field': (_jsonl_without_field, r"x\.jsonl' line 2 has no field data.text_field='text'"),
  'not utf-8': (_latin1, r"x\.txt' is not UTF-8"),
  'empty': (_empty_dir, r"'.*e' is empty"),
  'glob matches nothing': (lambda p: (str(p / 'nothing' / '*.txt'), {}), r"nothing/\*\.txt' matches no files"),
  'unknown corpus': (lambda p: ('wikipedia', {}), r"'wikipedia' is not a file.*'embedded'"),
  'val_fraction': (lambda p: ('embedded', {'val_fraction': 0.0}), 'val_fraction=0.0 must be'),
  'all NUL bytes': (_nul_bytes, r'holds no text to learn from: its \d+ training tokens use 0 distinct'),
  'one repeated character': (_one_char, r'use 1 distinct char token\(s\) besides NUL bytes'),
}


@pytest.mark.parametrize('case', sorted(BAD_SOURCES))
def test_bad_source_one_line_and_no_dataset(case, tmp_path):
  make, pattern = BAD_SOURCES[case]
  corpus, extra = make(tmp_path)
  out = tmp_path / 'ds'
  with pytest.raises(EffjaxError, match=pattern) as e:
    prepare.prepare(settings(corpus=corpus, **extra), out, workers=1)
  assert '\n' not in str(e.value)
  assert not (out / 'manifest.json').exists()
  assert not any(n.endswith('.bin') for n in (os.listdir(out) if out.exists() else []))


def _missing_shard(out, m):
  os.unlink(out / m['splits']['train']['shards'][1]['name'])


def _truncated_shard(out, m):
  p = out / m['splits']['val']['shards'][0]['name']
  p.write_bytes(p.read_bytes()[:-2])


def _corrupt_manifest(out, m):
  (out / 'manifest.json').write_text('{')


BAD_DATASETS = {
  'missing shard': (_missing_shard, r"is missing shard 'train-00001.bin'"),
  'truncated shard': (_truncated_shard, r"val-00000.bin' has \d+ bytes but the manifest says \d+"),
  'corrupt manifest': (_corrupt_manifest, r"manifest.json' is unreadable or corrupt"),
}


@pytest.fixture(scope='module')
def small_dataset(tmp_path_factory):
  root = tmp_path_factory.mktemp('ds')
  corpus = root / 'c.txt'
  corpus.write_text(code_like(300))
  m = prepare.prepare(settings(corpus=f'{corpus}', val_fraction=0.1), root / 'ds', shard_tokens=5000)
  return root / 'ds', m


@pytest.mark.parametrize('case', sorted(BAD_DATASETS))
def test_bad_dataset_one_line(case, small_dataset, tmp_path):
  import shutil

  out = tmp_path / 'ds'
  shutil.copytree(small_dataset[0], out)
  damage, pattern = BAD_DATASETS[case]
  damage(out, small_dataset[1])
  with pytest.raises(EffjaxError, match=pattern) as e:
    pipeline.open_dataset(out, seq_len=16)
  assert '\n' not in str(e.value)


def test_interrupted_prepare_restarts_cleanly(tmp_path, monkeypatch):
  d, _ = _write_files(tmp_path)
  s = settings(corpus=str(d), val_fraction=0.3)
  clean = prepare.prepare(s, tmp_path / 'clean', shard_tokens=600)
  out = tmp_path / 'ds'
  calls = []
  real = dataset.ShardWriter.write

  def interrupted(self, tokens):
    calls.append(1)
    if len(calls) == 3:
      raise KeyboardInterrupt
    real(self, tokens)

  monkeypatch.setattr(dataset.ShardWriter, 'write', interrupted)
  monkeypatch.setattr(prepare, 'BATCH_BYTES', 400)
  with pytest.raises(KeyboardInterrupt):
    prepare.prepare(s, out, shard_tokens=600)
  monkeypatch.undo()
  assert any(n.endswith('.bin') for n in os.listdir(out)) and not (out / 'manifest.json').exists()
  with pytest.raises(EffjaxError, match='holds no prepared dataset .*did not finish'):
    pipeline.open_dataset(out, seq_len=16)
  (out / 'train-00042.bin').write_bytes(b'stale')  # a leftover of an older, larger attempt
  (out / '.prepare.lock').write_text('999999999')  # left by a killed prepare: its process is gone
  again = prepare.prepare(s, out, shard_tokens=600)
  assert again['fingerprint'] == clean['fingerprint']
  assert sorted(os.listdir(out)) == sorted(os.listdir(tmp_path / 'clean'))
  shutil_rm = __import__('shutil').rmtree
  shutil_rm(out)
  out.mkdir()
  (out / '.prepare.lock').write_text(str(os.getpid()))  # a live preparer holds it
  with pytest.raises(EffjaxError, match=r'another prepare \(pid \d+\) is writing'):
    prepare.prepare(s, out)


def test_resume_refuses_a_dataset_of_another_tokenizer(small_dataset):
  b = pipeline.open_dataset(small_dataset[0], seq_len=16)
  pipeline.check_tokenizer({'tokenizer_sha256': b.identity['tokenizer_sha256']}, b, 'runs/x')
  pipeline.check_tokenizer({}, b, 'runs/x')  # checkpoints from before the check: nothing to compare
  with pytest.raises(
    EffjaxError,
    match=r'runs/x were trained with tokenizer 0123456789ab but the dataset .* was '
    r'made with tokenizer [0-9a-f]{12}',
  ):
    pipeline.check_tokenizer({'tokenizer_sha256': '0123456789abcdef'}, b, 'runs/x')


# ---------------------------------------------------------------- iterators

TOKENS = np.arange(5000, dtype=np.uint16)  # token value == position: windows are easy to check


def take(it, n):
  return [next(it) for _ in range(n)]


def test_train_iterator_deterministic_shifted_sharded():
  kw = dict(seq_len=16, batch_size=8)
  a = take(pipeline.make_train_iterator(TOKENS, seed=1, **kw), 5)
  b = take(pipeline.make_train_iterator(TOKENS, seed=1, **kw), 5)
  c = take(pipeline.make_train_iterator(TOKENS, seed=2, **kw), 5)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['inputs'], y['inputs'])
  assert not np.array_equal(a[0]['inputs'], c[0]['inputs'])
  x = a[0]
  assert x['inputs'].shape == x['targets'].shape == (8, 16) and x['inputs'].dtype == np.int32
  np.testing.assert_array_equal(x['targets'], x['inputs'] + 1)  # targets = next token
  np.testing.assert_array_equal(np.diff(x['inputs'], axis=1), 1)  # contiguous windows
  starts = [
    set(
      int(s)
      for bt in take(pipeline.make_train_iterator(TOKENS, seed=1, process_index=p, process_count=2, **kw), 10)
      for s in bt['inputs'][:, 0] // 16
    )
    for p in (0, 1)
  ]
  assert starts[0] and starts[1] and not starts[0] & starts[1]  # each chunk goes to one process per epoch
  with pytest.raises(EffjaxError, match='batch_size=7'):
    pipeline.make_train_iterator(TOKENS, seed=0, seq_len=16, batch_size=7, process_count=2)


def test_train_iterator_orbax_checkpoint_resume(tmp_path):
  import grain
  import orbax.checkpoint as ocp

  kw = dict(seq_len=16, batch_size=4, seed=3)
  it = pipeline.make_train_iterator(TOKENS, **kw)
  take(it, 7)
  mgr = ocp.CheckpointManager(str(tmp_path / 'ckpt'), options=ocp.CheckpointManagerOptions(create=True))
  mgr.save(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it), meta=ocp.args.JsonSave({'k': 7})))
  mgr.wait_until_finished()
  expected = take(it, 400)  # > one epoch (312 chunks / 4): resume must also keep the epoch reshuffle
  fresh = pipeline.make_train_iterator(TOKENS, **kw)
  mgr.restore(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh), meta=ocp.args.JsonRestore()))
  for x, y in zip(expected, take(fresh, 400)):
    np.testing.assert_array_equal(x['inputs'], y['inputs'])
  mgr.close()
  state = it.get_state()
  other = pipeline.make_train_iterator(TOKENS, **kw)
  other.set_state(state)
  np.testing.assert_array_equal(next(other)['inputs'], next(it)['inputs'])


def test_eval_batches():
  bs = pipeline.eval_batches(TOKENS, seq_len=16, batch_size=8, max_batches=3)
  assert len(bs) == 3 and all(b['inputs'].shape == (8, 16) for b in bs)
  starts = np.concatenate([b['inputs'][:, 0] for b in bs])
  np.testing.assert_array_equal(starts, np.arange(24) * 312 // 24 * 16)  # non-overlapping, spread over the split
  np.testing.assert_array_equal(np.diff(bs[1]['inputs'], axis=1), 1)
  np.testing.assert_array_equal(bs[2]['targets'], bs[2]['inputs'] + 1)
  assert len(pipeline.eval_batches(TOKENS, seq_len=16, batch_size=8, max_batches=1000)) == 312 // 8
  small = pipeline.eval_batches(TOKENS[:50], seq_len=16, batch_size=8, max_batches=3)
  assert len(small) == 1 and small[0]['inputs'].shape == (3, 16)
  with pytest.raises(EffjaxError, match='10 tokens.*17'):
    pipeline.eval_batches(TOKENS[:10], seq_len=16, batch_size=8, max_batches=3)
