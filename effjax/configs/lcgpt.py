"""lc-gpt (LinearlyCompressedGPT, arXiv 2404.14462): after every n=model.compress.compress_every blocks a
Linear(d, d/f) (f=model.compress.compress_factor) shrinks the width, d_m = d_0 / f^m; the head maps the last width
to the vocabulary.

Presets:
  tiny       4 blocks, widths 64 → 32 (head reads 16), 4 heads, char tokens, ctx 32: tests and smoke runs.
  (default)  the paper's network at CPU scale: 4 post-LN blocks, widths 192 → 96 (head reads 48), 6 heads,
             no final norm, untied head with bias, char tokens on the embedded corpus, ctx 128; CPU minutes.
  paper      exactly the study's lc-gpt: V=2116, d 384 → 192 → 96, 6 heads, ctx 256: 5,647,204 params
             (5.65 M, 21.54 MB).

How the paper's count is reached (same baseline as configs/gpt.py:paper_pgpt_baseline): token table V×384
(812,544) + positions 256×384 (98,304) + 2 blocks at 384 (2·1,774,464) + Linear 384→192 with bias (73,920)
+ 2 blocks at 192 (2·444,864) + Linear 192→96 with bias (18,528) + head 96→V with bias (205,252) = 5,647,204.
So the compression follows the LAST segment too (⌊L/n⌋ = 2 compressions, the head reads d_0/4 = 96, as in the
study's code and its d_m = d_0/2^m with m = ⌊N/n⌋), heads stay 6 at every width, and there is no final norm.
"""
from effjax.configs import base
from effjax.configs import gpt as gpt_config

FAMILY = 'lcgpt'


def tiny(c):
  c.model.update(num_layers=4, d_model=64, num_heads=4, max_len=32, dropout=0.0)
  c.data.update(seq_len=32, max_bytes=300_000)
  c.train.update(steps=40, batch_size=8, lr=3e-3, lr_schedule='cosine', warmup_steps=5, log_every=10,
                 eval_every=20, eval_batches=2)
  c.checkpoint.every = 20
  return c


def paper_architecture(c, family: str):
  """The study's compressed GPT around the 4-block post-LN baseline: compress after every 2 blocks by 2."""
  gpt_config.pgpt_baseline(c)
  c.model.update(family=family, final_norm=False)
  c.model.compress.update(compress_every=2, compress_factor=2, conv_kernel=1)
  return c


def make_config(family: str, variant: str, preset: str, extra_presets=None):
  c = base.get_base()
  paper_architecture(c, family)
  # CPU scale: the paper's network at half width, ctx 128, char tokens on the embedded corpus.
  c.model.update(vocab_size=0, d_model=192, num_heads=6, max_len=128, dropout=0.0)
  c.data.update(corpus='embedded', tokenizer='char', seq_len=128, max_bytes=4_000_000)
  c.train.update(steps=1200, batch_size=16, lr=2e-3, lr_schedule='cosine', warmup_steps=100, weight_decay=0.1,
                 log_every=50, eval_every=300)
  c.checkpoint.every = 300
  extra_presets = extra_presets or {}
  if preset == 'tiny':
    tiny(c)
  elif preset == 'paper':
    paper_architecture(c, family)
  elif preset in extra_presets:
    extra_presets[preset](c)
  elif preset:
    base.unknown_preset(variant, preset, ['tiny', 'paper', *extra_presets])
  return c


def get_config(preset: str = ''):
  return make_config(FAMILY, 'lcgpt', preset)
