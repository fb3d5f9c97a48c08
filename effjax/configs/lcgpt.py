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

from effjax.configs import presets

FAMILY = 'lcgpt'


def get_config(preset: str = ''):
  return presets.compressed_config(FAMILY, 'lcgpt', preset)
