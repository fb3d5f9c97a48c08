"""Adaptive FastFood MLPs (seed 004, §4): both MLP linear layers are y = c·S H G Π H B x (three learned diagonals,
two fast Walsh–Hadamard transforms, a fixed permutation), O(n log n) compute and O(n) trainable parameters per
layer in place of n². Family `gpt`; the technique is config only: model.mlp_kind='fastfood' (attention stays
dense). Widths should be powers of two (the FWHT pads to the next one otherwise).

Presets:
  tiny       2 layers x 64, char tokens, ctx 32: tests (seconds).
  (default)  4 layers x 256 (8 heads), char-level on the embedded corpus, 800 steps: a few CPU minutes.
  paper      the seed's structured Adaptive FastFood model: 12 layers, d 1024, 16 heads, on the `lighton`
             recipe of configs/presets.py (rotary, ctx 1024, BPE 50262, batch 80, peak lr 5e-4, no weight decay,
             clip 1).
"""

from effjax.configs import presets

KIND = 'fastfood'


def get_config(preset: str = ''):
  # FWHTs at n <= 1024 run slower than the small matmuls they replace on CPU: fewer steps for the same minutes
  return presets.structured_config('fastfood', KIND, preset, steps=800)
