"""Block-diagonal MLPs (seed 004, §4): each MLP linear layer is a block-diagonal matrix (model.num_blocks = 4
blocks: 1/4 of the dense parameters and FLOPs) followed by a block-Hadamard mixing of the blocks (long-range
correlations, no parameters). Family `gpt`; the technique is config only: model.mlp_kind='blockdiag'
(attention stays dense).

Presets:
  tiny       2 layers x 64, char tokens, ctx 32: tests (seconds).
  (default)  4 layers x 256 (8 heads), char-level on the embedded corpus, 1000 steps: a few CPU minutes.
  paper      the seed's structured block-diagonal model: 12 layers, d 1024, 16 heads, 4 blocks, on
             configs/gpt.py's `lighton` recipe (rotary, ctx 1024, BPE 50262, batch 80, peak lr 5e-4).
"""
from effjax.configs import fastfood

KIND = 'blockdiag'


def get_config(preset: str = ''):
  c = fastfood.structured_config('blockdiag', KIND, preset, steps=1000)
  c.model.num_blocks = 4
  return c
