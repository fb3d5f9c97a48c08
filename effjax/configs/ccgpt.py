"""cc-gpt (ConvCompressedGPT, arXiv 2404.14462): lc-gpt with each compressor a Conv1d over time
(kernel model.compress.conv_kernel, causal: kernel-1 zeros on the left, so position t never sees t' > t).

Presets:
  tiny       4 blocks, widths 64 → 32 (head reads 16), conv kernel 1, ctx 32: tests and smoke runs.
  (default)  as configs/lcgpt.py's default (widths 192 → 96, head 48) with kernel-1 convolutions.
  k3         the default with causal kernel-3 convolutions (each compressor also mixes the 2 previous tokens).
  paper      exactly the study's cc-gpt: kernel 1, V=2116, d 384 → 192 → 96: 5,647,204 params (5.65 M,
             21.54 MB) — a kernel-1 Conv1d(d, d/2) has exactly the weights and bias of Linear(d, d/2), so the
             count equals lc-gpt's (the paper lists both at 5.65 M / 21.54 MB).
"""

from effjax.configs import presets


def k3(c):
  c.model.compress.conv_kernel = 3
  return c


def get_config(preset: str = ''):
  return presets.compressed_config('ccgpt', 'ccgpt', preset, {'k3': k3})
