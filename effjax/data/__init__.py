"""Data: document sources -> prepare (split, tokenize on every core, shard) -> dataset directory -> grain batches."""

from effjax.data.dataset import identity as dataset_identity
from effjax.data.pipeline import DataBundle, eval_batches, load, make_train_iterator, open_dataset, prepare_data
from effjax.data.tokenizers import (ByteTokenizer, BpeTokenizer, CharTokenizer, Tokenizer, build_tokenizer,
                                    count_bytes, load_tokenizer)

__all__ = ["dataset_identity", "DataBundle", "eval_batches", "load", "make_train_iterator", "open_dataset",
           "prepare_data", "Tokenizer", "CharTokenizer", "ByteTokenizer", "BpeTokenizer", "build_tokenizer",
           "count_bytes", "load_tokenizer"]
