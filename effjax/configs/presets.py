"""Recipes that several built-in variants share, so each variant file imports only `base` and this module and no
variant builds on another. A recipe changes a config in place and returns it.

  gpt_default(c)          the CPU-scale pre-LN GPT that configs/gpt.py's default and the gpt-family variants
                          (doped, fastfood, blockdiag, lowrank) start from
  tiny(c, model=..., ...)  the test / smoke-run scale; a variant passes what its own tiny changes on top
  lighton(c, size)        the LightOn seed's baseline recipe at one of LIGHTON_SIZES
  pgpt_baseline(c)        the 4-block post-LN GPT of the p-gpt / lc-gpt / cc-gpt study
  study_cpu_scale(c)      that study's networks shrunk to CPU scale (pgpt, lcgpt, ccgpt defaults)
  structured_config(...)  a structured-MLP variant (fastfood, blockdiag): its default, tiny and paper presets
  compressed_config(...)  a compressed GPT variant (lcgpt, ccgpt): its default, tiny and paper presets
"""

from effjax.configs import base

# (layers, d_model, heads, peak lr) of the LightOn seed's baselines.
LIGHTON_SIZES = {
  'xxsmall': (3, 768, 12, 5e-4),
  'xsmall': (6, 768, 12, 5e-4),
  'small': (12, 768, 12, 5e-4),
  'medium': (24, 1024, 16, 3e-4),
}


def gpt_default(c):
  """4 layers x 192 (6 heads), char-level on the embedded Python corpus, ctx 128, 1200 steps: a few CPU minutes."""
  c.model.family = 'gpt'
  c.model.update(num_layers=4, d_model=192, num_heads=6, max_len=128)
  c.data.update(seq_len=128, tokenizer='char')
  c.train.update(steps=1200, batch_size=16, lr=2e-3, warmup_steps=100, log_every=50, eval_every=300)
  return c


def tiny(c, model: dict | None = None, data: dict | None = None, train: dict | None = None):
  """2 layers x 64 (4 heads), no dropout, ctx 32, 40 steps of batch 8: seconds (tests, smoke runs). `model`,
  `data` and `train` are the variant's own changes on top (e.g. train=dict(lr=3e-3))."""
  c.model.update(num_layers=2, d_model=64, num_heads=4, max_len=32, dropout=0.0)
  c.data.update(seq_len=32, max_bytes=300_000)
  c.train.update(steps=40, batch_size=8, warmup_steps=5, log_every=10, eval_every=20, eval_batches=2)
  c.checkpoint.every = 20
  for section, changes in (('model', model), ('data', data), ('train', train)):
    c[section].update(changes or {})
  return c


def lighton(c, size: str):
  """The seed's recipe: rotary GPT, ctx 1024, batch 80, Adam, cosine, no weight decay, clip 1, dropout 0.1."""
  layers, width, heads, lr = LIGHTON_SIZES[size]
  c.model.update(
    num_layers=layers,
    d_model=width,
    num_heads=heads,
    pos_emb='rotary',
    max_len=1024,
    vocab_size=50262,
    dropout=0.1,
    attn_dropout=0.1,
  )
  c.data.update(tokenizer='bpe', bpe_vocab_size=50262, seq_len=1024)
  c.train.update(batch_size=80, lr=lr, weight_decay=0.0, grad_clip=1.0, warmup_steps=5000, steps=100_000)
  return c


def pgpt_baseline(c):
  """The 4-block post-LN GPT that the p-gpt / lc-gpt / cc-gpt study compares against (its public code)."""
  c.model.update(
    num_layers=4,
    d_model=384,
    num_heads=6,
    max_len=256,
    vocab_size=2116,
    dropout=0.1,
    norm_position='post',
    final_norm=False,
    use_bias=True,
    tie_embeddings=False,
    head_bias=True,
    pos_emb='learned',
    scan_layers=True,
  )
  c.data.update(tokenizer='char', seq_len=256)
  c.train.update(
    batch_size=64,
    lr=3e-4,
    lr_schedule='constant',
    warmup_steps=0,
    weight_decay=1e-3,
    steps=10_000,
    decay_embeddings=True,
  )
  return c


def study_cpu_scale(c):
  """The study's network at half width (d 192, 6 heads), ctx 128, no dropout, char tokens on the embedded corpus,
  1200 steps of the CPU recipe."""
  c.model.update(vocab_size=0, d_model=192, num_heads=6, max_len=128, dropout=0.0)
  c.data.update(corpus='embedded', tokenizer='char', seq_len=128, max_bytes=4_000_000)
  c.train.update(
    steps=1200,
    batch_size=16,
    lr=2e-3,
    lr_schedule='cosine',
    warmup_steps=100,
    weight_decay=0.1,
    log_every=50,
    eval_every=300,
  )
  c.checkpoint.every = 300
  return c


# ------------------------------------------------------------------------------------ structured MLP variants
def structured_paper(c, kind: str):
  """Table 3 of seed 004: 12 x 1024 (16 heads) on the lighton recipe, peak lr 5e-4, structured MLPs."""
  lighton(c, 'medium')
  c.model.update(num_layers=12, mlp_kind=kind)
  c.train.lr = 5e-4
  return c


def structured_config(variant: str, kind: str, preset: str, steps: int):
  """gpt_default with MLPs of dense kind `kind`, 4 layers x 256 (8 heads), `steps` steps; presets tiny, paper."""
  c = gpt_default(base.get_base())
  c.model.update(num_layers=4, d_model=256, num_heads=8, mlp_kind=kind)
  c.train.update(steps=steps, eval_every=steps // 4)
  c.checkpoint.every = steps // 4
  if preset == 'tiny':
    tiny(c)
  elif preset == 'paper':
    structured_paper(c, kind)
  elif preset:
    base.unknown_preset(variant, preset, ['tiny', 'paper'])
  return c


# ------------------------------------------------------------------------------------- compressed GPT variants
def compressed_paper(c, family: str):
  """The study's compressed GPT around the 4-block post-LN baseline: compress after every 2 blocks by 2."""
  pgpt_baseline(c)
  c.model.update(family=family, final_norm=False)
  c.model.compress.update(compress_every=2, compress_factor=2, conv_kernel=1)
  return c


def compressed_config(family: str, variant: str, preset: str, extra_presets=None):
  """compressed_paper at study_cpu_scale; presets tiny (4 blocks), paper and the variant's `extra_presets`
  (name -> recipe)."""
  c = study_cpu_scale(compressed_paper(base.get_base(), family))
  extra_presets = extra_presets or {}
  if preset == 'tiny':
    tiny(c, model=dict(num_layers=4), train=dict(lr=3e-3))
  elif preset == 'paper':
    compressed_paper(c, family)
  elif preset in extra_presets:
    extra_presets[preset](c)
  elif preset:
    base.unknown_preset(variant, preset, ['tiny', 'paper', *extra_presets])
  return c
