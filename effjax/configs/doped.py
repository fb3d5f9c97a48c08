"""Doped GPT (seed 004, §3): trainable transformer blocks with frozen random MLPs (hidden 6·d) between them, the
first and last layer trainable. Family `gpt`; the technique is config only: model.doping.pattern (see
effjax/models/doped.py) and model.doping.frozen_mlp_ratio. model.num_layers counts the *trainable* blocks; with
doping.pattern='interleave' the stack has num_layers + (num_layers - 1) layers.

Presets:
  tiny       3 trainable 64-wide blocks + 2 frozen MLPs (TFTFT), char tokens, ctx 32: tests (seconds).
  (default)  4 trainable 192-wide blocks + 3 frozen MLPs, char-level on the embedded corpus: a few CPU minutes.
  nodoping   the default without its frozen MLPs (the same trainable parameters): the comparison run.
  xsmall / small / medium  the seed's Doped XSmall (3 + 2 = 5 layers, d 768), Doped Small (6 + 5 = 11, d 768)
             and Doped Medium (12 + 11 = 23, d 1024, 16 heads), on the `lighton` recipe (configs/presets.py)
             (rotary, ctx 1024, BPE 50262, batch 80, no weight decay, clip 1, dropout 0.1). Their trainable
             parameters equal those of the LightOn baselines xxsmall / xsmall (gpt.py) for XSmall / Small.
  paper      = medium.
"""

from effjax.configs import base, presets

# doped preset: (the lighton baseline whose width/heads/lr it takes, trainable blocks)
DOPED_SIZES = {
  'xsmall': ('xxsmall', 3),
  'small': ('xsmall', 6),
  'medium': ('medium', 12),
}


def doped(c, trainable_blocks: int):
  c.model.num_layers = trainable_blocks
  c.model.doping.update(pattern='interleave', frozen_mlp_ratio=6)
  return c


def get_config(preset: str = ''):
  c = presets.gpt_default(base.get_base())
  c.train.update(steps=1000, eval_every=250)
  c.checkpoint.every = 250
  doped(c, 4)
  if preset == 'tiny':
    presets.tiny(c)
    doped(c, 3)
  elif preset == 'nodoping':
    c.model.doping.pattern = ''
  elif preset in DOPED_SIZES or preset == 'paper':
    size, blocks = DOPED_SIZES['medium' if preset == 'paper' else preset]
    presets.lighton(c, size)
    doped(c, blocks)
  elif preset:
    base.unknown_preset('doped', preset, ['tiny', 'nodoping', *DOPED_SIZES, 'paper'])
  return c
