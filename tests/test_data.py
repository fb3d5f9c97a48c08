"""Data stack: corpora, tokenizers, token cache and grain iterators (small and CPU-fast)."""

import json
import os

import ml_collections
import numpy as np
import pytest

from effjax.data import corpora, pipeline, tokenizers
from effjax.errors import EffjaxError

CODE = ('def f(x):\n\treturn x + 1  # café ☕ 日本語\n\n'
        'class A:\n    """Ünïcödé docstring — with “quotes”."""\n    y = [1, 2, 3]\r\n') * 3


def cfg(**kw):
  d = dict(corpus="embedded", tokenizer="char", bpe_vocab_size=300, seq_len=16, max_bytes=0, val_fraction=0.2,
           text_field="text")
  d.update(kw)
  return ml_collections.ConfigDict(d)


def code_like(n):
  """Deterministic code-ish text with unicode, tabs and newlines."""
  rng = np.random.default_rng(0)
  names = ["alpha", "beta", "gamma", "δelta", "x", "y_1", "naïve", "数据"]
  lines = []
  for i in range(n):
    a, b = rng.choice(names, 2)
    lines.append(f"def {a}_{i}({b}):\n\treturn {b} * {i} + len('{a}')  # ✓ note\n")
  return "\n".join(lines)


# ---------------------------------------------------------------- tokenizers

@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
def test_round_trip_and_save_load(kind, tmp_path):
  train = code_like(200) + CODE
  tok = tokenizers.build_tokenizer(cfg(tokenizer=kind), train)
  assert tok.kind == kind
  for text in (CODE, train[:2000]):
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.ndim == 1
    assert ids.max() < tok.vocab_size
    assert tok.decode(ids) == text and tok.decode(list(ids)) == text
  if kind == "bpe":
    assert 256 < tok.vocab_size <= 300
    assert len(tok.encode(train)) < 0.7 * tokenizers.count_bytes(train)  # merges were learned
  tok.save(str(tmp_path))
  tok2 = tokenizers.load_tokenizer(str(tmp_path))
  assert tok2.kind == kind and tok2.vocab_size == tok.vocab_size
  np.testing.assert_array_equal(tok2.encode(CODE), tok.encode(CODE))


def test_bpe_chunked_encoding_equals_whole(monkeypatch):
  tok = tokenizers.build_tokenizer(cfg(tokenizer="bpe"), code_like(200))
  text = code_like(300)
  whole = tok.encode(text)
  monkeypatch.setattr(tokenizers, "_CHUNK", 100)
  assert len(tokenizers._chunks(text)) > 10
  np.testing.assert_array_equal(tok.encode(text), whole)


def test_char_unknown_is_zero():
  tok = tokenizers.CharTokenizer.from_text("abc\x00")
  assert tok.vocab_size == 4  # a, b, c + unknown (NUL is not a vocabulary entry)
  np.testing.assert_array_equal(tok.encode("axb\x00"), [1, 0, 2, 0])
  assert tok.decode([1, 0, 3]) == "a\ufffdc"
  assert tokenizers.count_bytes("é☕") == 5


def test_tokenizer_errors(tmp_path):
  with pytest.raises(EffjaxError, match="'wordpiece'"):
    tokenizers.build_tokenizer(cfg(tokenizer="wordpiece"), "abc")
  with pytest.raises(EffjaxError, match="does not exist"):
    tokenizers.load_tokenizer(str(tmp_path))
  (tmp_path / "tokenizer.json").write_text("{not json")
  with pytest.raises(EffjaxError, match="corrupt"):
    tokenizers.load_tokenizer(str(tmp_path))


# ---------------------------------------------------------------- corpora

def test_embedded_corpus_capped_split_by_file_and_stable():
  c = cfg(max_bytes=300_000, val_fraction=0.05)
  a, b = corpora.load_corpus(c), corpora.load_corpus(c)
  assert a.train_text and a.val_text and a.num_train_docs >= 1 and a.num_val_docs >= 1
  assert a.fingerprint == b.fingerprint and a.train_text == b.train_text
  n = tokenizers.count_bytes(a.train_text) + tokenizers.count_bytes(a.val_text)
  assert 250_000 < n < 300_000 + 20_000
  assert a.val_text not in a.train_text  # whole files, not characters, go to validation
  assert "import" in a.train_text
  assert corpora.load_corpus(cfg(max_bytes=200_000, val_fraction=0.05)).fingerprint != a.fingerprint


def test_shakespeare_corpus():
  c = corpora.load_corpus(cfg(corpus="shakespeare", max_bytes=200_000))
  assert c.train_text and c.val_text and c.name == "shakespeare"


def _write_files(tmp_path):
  d = tmp_path / "src"
  (d / "sub").mkdir(parents=True)
  docs = {f"{'sub/' if i >= 10 else ''}f{i}.py": f"# file {i}\n" + code_like(5 + i) for i in range(12)}
  for name, text in docs.items():
    (d / name).write_text(text, encoding="utf-8")
  (d / ".hidden").write_text("SECRET")
  return d, docs


def test_user_dir_split_by_file(tmp_path):
  d, docs = _write_files(tmp_path)
  c = corpora.load_corpus(cfg(corpus=str(d), val_fraction=0.3))
  assert "SECRET" not in c.train_text + c.val_text
  assert c.num_train_docs + c.num_val_docs == len(docs)
  for name, text in docs.items():
    assert text in (c.val_text if corpora.is_val(os.path.join("src", name), 0.3) else c.train_text)
  assert c.num_val_docs >= 1 and c.num_train_docs >= 1


def test_cap_keeps_validation_non_empty(tmp_path):
  d, docs = _write_files(tmp_path)
  assert not corpora.is_val("src/f0.py", 0.3) and corpora.is_val("src/f3.py", 0.3)
  c = corpora.load_corpus(cfg(corpus=str(d), val_fraction=0.3, max_bytes=50))
  assert c.train_text.encode() == docs["f0.py"].encode()[:50]  # the cap (bytes) cut the first (train) file
  assert (c.num_train_docs, c.num_val_docs) == (1, 1)
  assert c.val_text == docs["f3.py"]  # the next validation file (truncated to 1 KiB if longer)


def test_user_glob_jsonl_and_commas(tmp_path):
  d, _ = _write_files(tmp_path)
  jl = tmp_path / "data.jsonl"
  jl.write_text("\n".join(json.dumps({"body": f"doc {i} ✓", "id": i}) for i in range(30)) + "\n\n")
  c = corpora.load_corpus(cfg(corpus=f"{d}/*.py, {jl}", text_field="body", val_fraction=0.2))
  assert c.num_train_docs + c.num_val_docs == 10 + 30  # sub/ is not matched by the non-recursive glob
  assert "doc 7 ✓" in c.train_text + c.val_text and "# file 3" in c.train_text + c.val_text
  assert "# file 11" not in c.train_text + c.val_text
  c2 = corpora.load_corpus(cfg(corpus=f"{d}/**/*.py", val_fraction=0.2))
  assert c2.num_train_docs + c2.num_val_docs == 12


def test_single_document_split_by_characters(tmp_path):
  f = tmp_path / "one.txt"
  f.write_text("abcdefghij" * 10)
  c = corpora.load_corpus(cfg(corpus=str(f), val_fraction=0.1))
  assert c.train_text + c.val_text == "abcdefghij" * 10 and len(c.val_text) == 10


def test_corpus_errors(tmp_path):
  jl = tmp_path / "bad.jsonl"
  jl.write_text('{"text": "ok"}\n{"content": "no text"}\n')
  with pytest.raises(EffjaxError, match=r"bad\.jsonl.*line 2.*'text'"):
    corpora.load_corpus(cfg(corpus=str(jl)))
  bin_file = tmp_path / "latin1.txt"
  bin_file.write_bytes("caf\xe9".encode("latin-1"))
  with pytest.raises(EffjaxError, match=r"latin1\.txt.*not UTF-8"):
    corpora.load_corpus(cfg(corpus=str(bin_file)))
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "a.txt").write_text("")
  with pytest.raises(EffjaxError, match="'.*empty'.* is empty"):
    corpora.load_corpus(cfg(corpus=str(empty)))
  with pytest.raises(EffjaxError, match=r"'.*nothing/\*\.txt' matches no files"):
    corpora.load_corpus(cfg(corpus=str(tmp_path / "nothing" / "*.txt")))
  with pytest.raises(EffjaxError, match="'wikipedia' is not a file.*'embedded'"):
    corpora.load_corpus(cfg(corpus="wikipedia"))
  with pytest.raises(EffjaxError, match="val_fraction=0.0"):
    corpora.load_corpus(cfg(val_fraction=0.0))


# ---------------------------------------------------------------- cache

def test_prepare_data_caches_and_never_rereads(tmp_path, monkeypatch):
  d, _ = _write_files(tmp_path)
  c = cfg(corpus=str(d), tokenizer="bpe", val_fraction=0.3)
  cache = str(tmp_path / "cache")
  a = pipeline.prepare_data(c, cache)
  assert a.train_tokens.dtype == np.uint16 and a.val_tokens.ndim == 1
  assert a.val_bytes_per_token > 1.0
  assert sorted(os.listdir(cache)) == ["meta.json", "tokenizer.json", "train.bin", "val.bin"]

  def boom(_):
    raise AssertionError("corpus re-read")
  monkeypatch.setattr(corpora, "load_corpus", boom)
  c.seq_len = 8  # seq_len is not part of the cache key
  b = pipeline.prepare_data(c, cache)
  assert isinstance(b.train_tokens, np.memmap)
  np.testing.assert_array_equal(b.train_tokens, a.train_tokens)
  np.testing.assert_array_equal(b.val_tokens, a.val_tokens)
  assert (b.fingerprint, b.val_bytes_per_token) == (a.fingerprint, a.val_bytes_per_token)
  assert b.tokenizer.decode(b.val_tokens[:50]) == a.tokenizer.decode(a.val_tokens[:50])

  c.tokenizer = "char"
  with pytest.raises(EffjaxError, match="data.tokenizer='bpe'.*data.tokenizer='char'"):
    pipeline.prepare_data(c, cache)
  c.tokenizer, c.max_bytes = "bpe", 1000
  with pytest.raises(EffjaxError, match="data.max_bytes=0.*data.max_bytes=1000"):
    pipeline.prepare_data(c, cache)


def test_corpus_shorter_than_context(tmp_path):
  d, _ = _write_files(tmp_path)
  with pytest.raises(EffjaxError, match=r"(train|val) split has \d+ tokens.*seq_len=100000"):
    pipeline.prepare_data(cfg(corpus=str(d), tokenizer="byte", seq_len=100_000), str(tmp_path / "c"))
  assert not os.path.exists(tmp_path / "c" / "meta.json")


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
    np.testing.assert_array_equal(x["inputs"], y["inputs"])
  assert not np.array_equal(a[0]["inputs"], c[0]["inputs"])
  x = a[0]
  assert x["inputs"].shape == x["targets"].shape == (8, 16) and x["inputs"].dtype == np.int32
  np.testing.assert_array_equal(x["targets"], x["inputs"] + 1)  # targets = next token
  np.testing.assert_array_equal(np.diff(x["inputs"], axis=1), 1)  # contiguous windows
  starts = [set(int(s) for bt in take(pipeline.make_train_iterator(TOKENS, seed=1, process_index=p,
                                                                   process_count=2, **kw), 10)
                for s in bt["inputs"][:, 0] // 16) for p in (0, 1)]
  assert starts[0] and starts[1] and not starts[0] & starts[1]  # each chunk goes to one process per epoch
  with pytest.raises(EffjaxError, match="batch_size=7"):
    pipeline.make_train_iterator(TOKENS, seed=0, seq_len=16, batch_size=7, process_count=2)


def test_train_iterator_orbax_checkpoint_resume(tmp_path):
  import grain
  import orbax.checkpoint as ocp
  kw = dict(seq_len=16, batch_size=4, seed=3)
  it = pipeline.make_train_iterator(TOKENS, **kw)
  take(it, 7)
  mgr = ocp.CheckpointManager(str(tmp_path / "ckpt"), options=ocp.CheckpointManagerOptions(create=True))
  mgr.save(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it), meta=ocp.args.JsonSave({"k": 7})))
  mgr.wait_until_finished()
  expected = take(it, 400)  # > one epoch (312 chunks / 4): resume must also keep the epoch reshuffle
  fresh = pipeline.make_train_iterator(TOKENS, **kw)
  mgr.restore(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh),
                                         meta=ocp.args.JsonRestore()))
  for x, y in zip(expected, take(fresh, 400)):
    np.testing.assert_array_equal(x["inputs"], y["inputs"])
  mgr.close()
  state = it.get_state()
  other = pipeline.make_train_iterator(TOKENS, **kw)
  other.set_state(state)
  np.testing.assert_array_equal(next(other)["inputs"], next(it)["inputs"])


def test_eval_batches():
  bs = pipeline.eval_batches(TOKENS, seq_len=16, batch_size=8, max_batches=3)
  assert len(bs) == 3 and all(b["inputs"].shape == (8, 16) for b in bs)
  flat = np.concatenate([b["inputs"].reshape(-1) for b in bs])
  np.testing.assert_array_equal(flat, np.arange(3 * 8 * 16))  # non-overlapping, from the start
  np.testing.assert_array_equal(bs[2]["targets"], bs[2]["inputs"] + 1)
  assert len(pipeline.eval_batches(TOKENS, seq_len=16, batch_size=8, max_batches=1000)) == 312 // 8
  small = pipeline.eval_batches(TOKENS[:50], seq_len=16, batch_size=8, max_batches=3)
  assert len(small) == 1 and small[0]["inputs"].shape == (3, 16)
  with pytest.raises(EffjaxError, match="10 tokens.*17"):
    pipeline.eval_batches(TOKENS[:10], seq_len=16, batch_size=8, max_batches=3)
