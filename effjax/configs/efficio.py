"""GPT-Efficio (arXiv 2309.06589): one transformer block applied at every layer (cross-layer sharing with nn.scan,
params broadcast) and a factorized embedding (a V×E word-piece table and an E×H projection; the tied head computes
logits = h·Pᵀ·Wᵀ). Family `gpt`: the technique is config only (model.share_layers, model.num_groups,
model.embed_dim).

Presets:
  tiny       1 shared 64-wide block applied 4 times, E=32, char tokens, ctx 32: tests and smoke runs (seconds).
  (default)  1 shared 192-wide block applied 8 times, BPE 4096, E=64, ctx 128: a few CPU minutes.
  paper      ~0.94 B total params. The paper gives only the total (950M), "the same set of parameters is applied
             across all transformer layers" and the V×E + E×H factorization; the rest is our choice:
             GPT-2/3 BPE vocab V=50257, E=128 (ALBERT's value), one shared block of width H=8832 (69 heads of
             128, MLP 4H) applied L=24 times, rotary positions (no position table), context 2048 (GPT-3's),
             tied factorized head. A single shared block must be ~8.8k wide to reach ~0.95 B:
             block 12H²+13H = 936.2 M, embedding V·E + E·H = 7.56 M, final norm 2H.
  Ablations at the default scale (one change each):
  nosharing  8 independent blocks, factorized embedding.
  nofactor   shared block, full V×H table.
  baseline   neither: a plain GPT of the same shape.
  groups2 / groups4  G=2 / 4 distinct blocks, each applied L/G consecutive times, factorized embedding.
"""

from effjax.configs import base, presets

ABLATIONS = {
  # preset: (share_layers, num_groups, factorized)
  'nosharing': ('none', 1, True),
  'nofactor': ('all', 1, False),
  'baseline': ('none', 1, False),
  'groups2': ('groups', 2, True),
  'groups4': ('groups', 4, True),
}
DEFAULT_EMBED_DIM = 64


def paper(c):
  c.model.update(
    num_layers=24,
    d_model=8832,
    num_heads=69,
    max_len=2048,
    vocab_size=50257,
    embed_dim=128,
    pos_emb='rotary',
    share_layers='all',
    tie_embeddings=True,
    dtype='bfloat16',
  )
  c.data.update(tokenizer='bpe', bpe_vocab_size=50257, seq_len=2048)
  c.train.update(batch_size=512, lr=3e-4, warmup_steps=2000, steps=300_000)
  return c


def get_config(preset: str = ''):
  c = base.get_base()
  c.model.family = 'gpt'
  c.model.update(
    num_layers=8,
    d_model=192,
    num_heads=6,
    max_len=128,
    share_layers='all',
    num_groups=1,
    embed_dim=DEFAULT_EMBED_DIM,
    tie_embeddings=True,
    pos_emb='learned',
  )
  c.data.update(tokenizer='bpe', bpe_vocab_size=4096, seq_len=128, max_bytes=3_000_000)
  c.train.update(steps=600, batch_size=16, lr=2e-3, warmup_steps=60, log_every=50, eval_every=200)
  c.checkpoint.every = 200
  if preset == 'tiny':
    presets.tiny(c, model=dict(num_layers=4, embed_dim=32), data=dict(tokenizer='char'), train=dict(lr=3e-3))
  elif preset == 'paper':
    paper(c)
  elif preset in ABLATIONS:
    share, groups, factorized = ABLATIONS[preset]
    c.model.update(share_layers=share, num_groups=groups, embed_dim=DEFAULT_EMBED_DIM if factorized else 0)
  elif preset:
    base.unknown_preset('efficio', preset, ['tiny', 'paper', *ABLATIONS])
  return c
