"""Data: corpora -> tokenizer -> cached token arrays -> grain batches."""

from effjax.data.corpora import Corpus, load_corpus
from effjax.data.pipeline import DataBundle, eval_batches, make_train_iterator, prepare_data
from effjax.data.tokenizers import (ByteTokenizer, BpeTokenizer, CharTokenizer, Tokenizer, build_tokenizer,
                                    count_bytes, load_tokenizer)

__all__ = ["Corpus", "load_corpus", "DataBundle", "eval_batches", "make_train_iterator", "prepare_data",
           "Tokenizer", "CharTokenizer", "ByteTokenizer", "BpeTokenizer", "build_tokenizer", "count_bytes",
           "load_tokenizer"]
