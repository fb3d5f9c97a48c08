"""Low-rank factorized projections: every attention and MLP linear layer is W ≈ U·V of rank
model.dense.lowrank_rank (effjax/models/lowrank.py), r·(in + out) parameters in place of in·out. Family `gpt`;
the technique is config only: model.mlp_kind / model.attn_kind = 'lowrank'.

Presets:
  tiny       2 layers x 64, rank 8 in attention and MLP, char tokens, ctx 32: tests (seconds).
  (default)  4 layers x 256 (8 heads), rank 64 in attention and MLP, char-level on the embedded corpus, 1000
             steps: a few CPU minutes.
  mlp        the default with dense attention: only the MLPs (2/3 of a block's weights) are low-rank.
"""

from effjax.configs import base, presets


def get_config(preset: str = ''):
  c = presets.gpt_default(base.get_base())
  c.model.update(num_layers=4, d_model=256, num_heads=8, mlp_kind='lowrank', attn_kind='lowrank')
  c.model.dense.lowrank_rank = 64  # the kind's own key: base.py does not know it
  c.train.update(steps=1000, eval_every=250)
  c.checkpoint.every = 250
  if preset == 'tiny':
    presets.tiny(c)
    c.model.dense.lowrank_rank = 8
  elif preset == 'mlp':
    c.model.attn_kind = 'dense'
  elif preset:
    base.unknown_preset('lowrank', preset, ['tiny', 'mlp'])
  return c
