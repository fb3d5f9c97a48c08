"""A PyTorch reference of effjax's baseline GPT (nanoGPT style), for the side-by-side benchmark.

Same architecture as `effjax.models.gpt.GPT` for a `family='gpt'` config without sharing, factorization or
structured layers: pre-LN (or post-LN) blocks, causal multi-head attention with a fused QKV projection
(F.scaled_dot_product_attention), tanh-GELU MLP, learned or rotary (GPT-NeoX half-split) positions, tied or untied
head. The parameter count equals effjax's for the same config, and `load_effjax_params` copies an effjax param
tree in so both compute the same logits (tests/test_experiments.py), which is what makes the benchmark compare
the same model. `make_train_step` is the same training step: cross-entropy, backward, global-norm clipping and
AdamW with decay on the matrices only (effjax's `optim.decay_mask`).
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from effjax import checkpoint


def check_supported(m) -> None:
  """The reference covers the plain GPT; anything else would make the comparison meaningless."""
  problems = []
  if m.family != 'gpt':
    problems.append(f'family={m.family!r}')
  for key, plain in (
    ('share_layers', 'none'),
    ('mlp_kind', 'dense'),
    ('attn_kind', 'dense'),
    ('doping.pattern', ''),
    ('embed_dim', 0),
  ):
    value = checkpoint.lookup(m, key)
    if value not in (None, plain):
      problems.append(f'{key}={value!r}')
  if problems:
    raise ValueError(f'experiments.torch_gpt supports the plain GPT only; got {", ".join(problems)}')


def _rotary(x_BxNxTxK: torch.Tensor, base: float) -> torch.Tensor:
  t, k = x_BxNxTxK.shape[-2], x_BxNxTxK.shape[-1]
  inv_freq = 1.0 / (base ** (torch.arange(0, k, 2, dtype=torch.float32) / k))
  angles_TxH = torch.arange(t, dtype=torch.float32)[:, None] * inv_freq[None, :]
  sin, cos = angles_TxH.sin(), angles_TxH.cos()
  x1, x2 = x_BxNxTxK.chunk(2, dim=-1)
  return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _norm(m, d: int) -> nn.Module:
  if m.norm == 'rmsnorm':
    return nn.RMSNorm(d, eps=1e-5)
  return nn.LayerNorm(d, eps=1e-5, bias=m.use_bias)


class CausalSelfAttention(nn.Module):
  def __init__(self, m):
    super().__init__()
    d = m.d_model
    self.n_head, self.pos_emb, self.rope_base = m.num_heads, m.pos_emb, m.rope_base
    self.c_attn = nn.Linear(d, 3 * d, bias=m.use_bias)
    self.c_proj = nn.Linear(d, d, bias=m.use_bias)

  def forward(self, x_BxTxD):
    b, t, d = x_BxTxD.shape
    q, k, v = self.c_attn(x_BxTxD).split(d, dim=2)
    q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
    if self.pos_emb == 'rotary':
      q, k = _rotary(q, self.rope_base), _rotary(k, self.rope_base)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, d))


class MLP(nn.Module):
  def __init__(self, m):
    super().__init__()
    self.c_fc = nn.Linear(m.d_model, m.mlp_ratio * m.d_model, bias=m.use_bias)
    self.c_proj = nn.Linear(m.mlp_ratio * m.d_model, m.d_model, bias=m.use_bias)

  def forward(self, x):
    return self.c_proj(F.gelu(self.c_fc(x), approximate='tanh'))


class Block(nn.Module):
  def __init__(self, m):
    super().__init__()
    self.pre = m.norm_position == 'pre'
    self.ln_1, self.attn, self.ln_2, self.mlp = _norm(m, m.d_model), CausalSelfAttention(m), _norm(m, m.d_model), MLP(m)

  def forward(self, x):
    if self.pre:
      x = x + self.attn(self.ln_1(x))
      return x + self.mlp(self.ln_2(x))
    x = self.ln_1(x + self.attn(x))
    return self.ln_2(x + self.mlp(x))


class TorchGPT(nn.Module):
  """effjax's GPT in PyTorch; `m` is an effjax model config (config.model)."""

  def __init__(self, m):
    super().__init__()
    check_supported(m)
    self.m = m
    d = m.d_model
    self.wte = nn.Embedding(m.vocab_size, d)
    self.wpe = nn.Embedding(m.max_len, d) if m.pos_emb == 'learned' else None
    self.h = nn.ModuleList(Block(m) for _ in range(m.num_layers))
    self.ln_f = _norm(m, d) if m.final_norm else None
    self.lm_head = None if m.tie_embeddings else nn.Linear(d, m.vocab_size, bias=m.head_bias)
    self.apply(self._init_weights)
    for name, p in self.named_parameters():
      if name.endswith('c_proj.weight'):
        nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * m.num_layers))

  @staticmethod
  def _init_weights(module):
    if isinstance(module, (nn.Linear, nn.Embedding)):
      nn.init.normal_(module.weight, 0.0, 0.02)
      if getattr(module, 'bias', None) is not None:
        nn.init.zeros_(module.bias)

  def forward(self, idx_BxT):
    t = idx_BxT.shape[1]
    x = self.wte(idx_BxT)
    if self.wpe is not None:
      x = x + self.wpe(torch.arange(t, device=idx_BxT.device))
    for block in self.h:
      x = block(x)
    if self.ln_f is not None:
      x = self.ln_f(x)
    return x @ self.wte.weight.T if self.lm_head is None else self.lm_head(x)


def num_params(model: nn.Module) -> int:
  return sum(p.numel() for p in model.parameters())


def load_effjax_params(model: TorchGPT, params) -> None:
  """Copies an effjax GPT param tree (scanned or unrolled layout) into `model`, in place."""
  from effjax.models import layers  # pylint: disable=import-outside-toplevel

  p = layers.unstack_layers(dict(params))
  t = lambda a: torch.from_numpy(np.array(a, np.float32))

  def norm(mod, tree):
    mod.weight.data.copy_(t(tree['scale']))
    if 'bias' in tree:
      mod.bias.data.copy_(t(tree['bias']))

  def linear(mod, kernels, biases=None):
    mod.weight.data.copy_(t(np.concatenate([np.asarray(k) for k in kernels], axis=1)).T)
    if biases is not None and mod.bias is not None:
      mod.bias.data.copy_(t(np.concatenate([np.asarray(b) for b in biases])))

  with torch.no_grad():
    model.wte.weight.copy_(t(p['embed']['embedding']))
    if model.wpe is not None:
      model.wpe.weight.copy_(t(p['embed']['pos_embedding']))
    for i, block in enumerate(model.h):
      lp = p['stack'][f'layer_{i}']
      a = lp['attn']
      names = ('query', 'key', 'value')
      linear(
        block.attn.c_attn,
        [a[n]['kernel'] for n in names],
        [a[n]['bias'] for n in names] if 'bias' in a['query'] else None,
      )
      linear(block.attn.c_proj, [a['out']['kernel']], [a['out']['bias']] if 'bias' in a['out'] else None)
      for mod, name in ((block.mlp.c_fc, 'fc'), (block.mlp.c_proj, 'proj')):
        linear(mod, [lp['mlp'][name]['kernel']], [lp['mlp'][name]['bias']] if 'bias' in lp['mlp'][name] else None)
      norm(block.ln_1, lp['ln1'])
      norm(block.ln_2, lp['ln2'])
    if model.ln_f is not None:
      norm(model.ln_f, p['ln_f'])
    if model.lm_head is not None:
      hp = p['head']['head']
      linear(model.lm_head, [hp['kernel']], [hp['bias']] if 'bias' in hp else None)


def make_optimizer(model: nn.Module, tc) -> torch.optim.Optimizer:
  """AdamW like effjax's: decay on Linear weights (effjax 'kernel' leaves) only; fused kernel where available."""
  decay = [
    p
    for n, p in model.named_parameters()
    if n.endswith('.weight') and p.dim() == 2 and 'wte' not in n and 'wpe' not in n
  ]
  ids = {id(p) for p in decay}
  rest = [p for p in model.parameters() if id(p) not in ids]
  groups = [{'params': decay, 'weight_decay': tc.weight_decay}, {'params': rest, 'weight_decay': 0.0}]
  kw = dict(lr=tc.lr, betas=(tc.b1, tc.b2), eps=tc.eps)
  try:
    return torch.optim.AdamW(groups, fused=True, **kw)
  except (RuntimeError, TypeError, ValueError):
    return torch.optim.AdamW(groups, foreach=True, **kw)


def make_train_step(model: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float = 1.0):
  """One full training step (forward, loss, backward, clip, AdamW update); returns the loss tensor."""

  def step(inputs_BxT, targets_BxT):
    logits = model(inputs_BxT)
    loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets_BxT.reshape(-1))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
      torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss.detach()

  return step


def set_threads(n: int | None = None) -> int:
  n = n or os.cpu_count()
  torch.set_num_threads(n)
  return n
