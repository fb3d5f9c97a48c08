"""Block-diagonal MLPs (seed 004, §4): each MLP linear layer is a block-diagonal matrix (model.dense.num_blocks
= 4 blocks: 1/4 of the dense parameters and FLOPs) and block-Hadamard transforms mix the blocks (long-range
correlations, no parameters). Family `gpt`; the technique is config only: model.mlp_kind='blockdiag' (attention
stays dense). Where the mixing goes (model.dense.blockdiag_mix):
  'expanding'  the seed's Figure 5: two block-diagonal matrices and ONE block-Hadamard per MLP, after the first
               (expanding) matrix: block-diag -> block-Hadamard -> GELU -> block-diag.
  'each'       a block-Hadamard after every block-diagonal layer (attention projections included, should
               attn_kind be 'blockdiag'), so no stack of them is block-separable; 3 extra FLOPs per output.

Presets:
  tiny       2 layers x 64, char tokens, ctx 32: tests (seconds); 'each'.
  (default)  4 layers x 256 (8 heads), char-level on the embedded corpus, 1000 steps: a few CPU minutes; 'each'
             (the runs in experiments/results were made with it).
  figure5    the default with the seed's mixing ('expanding').
  paper      the seed's structured block-diagonal model, as the seed describes it ('expanding'): 12 layers,
             d 1024, 16 heads, 4 blocks, on the `lighton` recipe of configs/presets.py (rotary, ctx 1024, BPE
             50262, batch 80, peak lr 5e-4).
"""

from effjax.configs import base, presets

KIND = 'blockdiag'
PRESETS = ['tiny', 'figure5', 'paper']


def get_config(preset: str = ''):
  if preset and preset not in PRESETS:
    base.unknown_preset('blockdiag', preset, PRESETS)
  c = presets.structured_config('blockdiag', KIND, '' if preset == 'figure5' else preset, steps=1000)
  c.model.dense.update(num_blocks=4, blockdiag_mix='expanding' if preset in ('figure5', 'paper') else 'each')
  return c
