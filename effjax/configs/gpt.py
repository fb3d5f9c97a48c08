"""GPT baseline: pre-LN causal transformer with tied embeddings.

Presets:
  tiny                 2 layers x 64 wide; trains in seconds (tests, smoke runs).
  (default)            4 layers x 192 wide, char-level on the embedded Python corpus; a few CPU minutes.
  paper                GPT-2 small (12 x 768, 12 heads, ctx 1024, vocab 50257): 124,439,808 params.
  paper_pgpt_baseline  the 4-block post-LN GPT of the p-gpt study (d 384, ctx 256, vocab 2116): 8.82 M.
  xxsmall/xsmall/small/medium  baselines of "Is the number of trainable parameters all that matters?"
                       (rotary positions, ctx 1024, BPE vocab 50262).
"""
from effjax.configs import base

# (layers, d_model, heads, peak lr) of the LightOn seed's baselines.
LIGHTON_SIZES = {
    'xxsmall': (3, 768, 12, 5e-4),
    'xsmall': (6, 768, 12, 5e-4),
    'small': (12, 768, 12, 5e-4),
    'medium': (24, 1024, 16, 3e-4),
}


def lighton(c, size: str):
  """The seed's recipe: rotary GPT, ctx 1024, batch 80, Adam, cosine, no weight decay, clip 1, dropout 0.1."""
  layers, width, heads, lr = LIGHTON_SIZES[size]
  c.model.update(num_layers=layers, d_model=width, num_heads=heads, pos_emb='rotary', max_len=1024,
                 vocab_size=50262, dropout=0.1, attn_dropout=0.1)
  c.data.update(tokenizer='bpe', bpe_vocab_size=50262, seq_len=1024)
  c.train.update(batch_size=80, lr=lr, weight_decay=0.0, grad_clip=1.0, warmup_steps=5000, steps=100_000)
  return c


def pgpt_baseline(c):
  """The 4-block post-LN GPT that the p-gpt / lc-gpt / cc-gpt study compares against (its public code)."""
  c.model.update(num_layers=4, d_model=384, num_heads=6, max_len=256, vocab_size=2116, dropout=0.1,
                 norm_position='post', final_norm=False, use_bias=True, tie_embeddings=False, head_bias=True,
                 pos_emb='learned', scan_layers=True)
  c.data.update(tokenizer='char', seq_len=256)
  c.train.update(batch_size=64, lr=3e-4, lr_schedule='constant', warmup_steps=0, weight_decay=1e-3,
                 steps=10_000, decay_embeddings=True)
  return c


def tiny(c):
  c.model.update(num_layers=2, d_model=64, num_heads=4, max_len=32)
  c.data.update(seq_len=32, max_bytes=300_000)
  c.train.update(steps=40, batch_size=8, warmup_steps=5, log_every=10, eval_every=20, eval_batches=2)
  c.checkpoint.every = 20
  return c


def get_config(preset: str = ''):
  c = base.get_base()
  c.model.family = 'gpt'
  c.model.update(num_layers=4, d_model=192, num_heads=6, max_len=128)
  c.data.update(seq_len=128, tokenizer='char')
  c.train.update(steps=1200, batch_size=16, lr=2e-3, warmup_steps=100, log_every=50, eval_every=300)
  if preset == 'tiny':
    tiny(c)
  elif preset == 'paper':
    c.model.update(num_layers=12, d_model=768, num_heads=12, max_len=1024, vocab_size=50257)
    c.data.update(tokenizer='bpe', bpe_vocab_size=50257, seq_len=1024)
    c.train.update(batch_size=512, lr=6e-4, warmup_steps=2000, steps=600_000)
  elif preset == 'paper_pgpt_baseline':
    pgpt_baseline(c)
  elif preset in LIGHTON_SIZES:
    lighton(c, preset)
  elif preset:
    base.unknown_preset('gpt', preset, ['tiny', 'paper', 'paper_pgpt_baseline', *LIGHTON_SIZES])
  return c
