"""Data: document sources -> prepare (split, tokenize on every core, shard) -> dataset directory -> grain batches.

Modules: sources (streaming readers), prepare (the prepare step, `python -m effjax.data.prepare`), dataset (the
on-disk format, `dataset.identity(DIR)`), tokenizers, pipeline (what a run reads). Nothing is imported here, so
the prepare step's worker processes load only what tokenizing needs (not jax / grain).
"""
