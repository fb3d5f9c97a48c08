"""GPT baseline: pre-LN causal transformer with tied embeddings.

Presets:
  tiny                 2 layers x 64 wide; trains in seconds (tests, smoke runs).
  (default)            4 layers x 192 wide, char-level on the embedded Python corpus; a few CPU minutes.
  paper                GPT-2 small (12 x 768, 12 heads, ctx 1024, vocab 50257): 124,439,808 params.
  paper_pgpt_baseline  the 4-block post-LN GPT of the p-gpt study (d 384, ctx 256, vocab 2116): 8.82 M.
  xxsmall/xsmall/small/medium  baselines of "Is the number of trainable parameters all that matters?"
                       (rotary positions, ctx 1024, BPE vocab 50262; presets.lighton).
"""

from effjax.configs import base, presets


def get_config(preset: str = ''):
  c = presets.gpt_default(base.get_base())
  if preset == 'tiny':
    presets.tiny(c)
  elif preset == 'paper':
    c.model.update(num_layers=12, d_model=768, num_heads=12, max_len=1024, vocab_size=50257)
    c.data.update(tokenizer='bpe', bpe_vocab_size=50257, seq_len=1024)
    c.train.update(batch_size=512, lr=6e-4, warmup_steps=2000, steps=600_000)
  elif preset == 'paper_pgpt_baseline':
    presets.pgpt_baseline(c)
  elif preset in presets.LIGHTON_SIZES:
    presets.lighton(c, preset)
  elif preset:
    base.unknown_preset('gpt', preset, ['tiny', 'paper', 'paper_pgpt_baseline', *presets.LIGHTON_SIZES])
  return c
