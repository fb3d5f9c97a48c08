"""Model-config checks: every incompatible setting stops with one line naming the value and what is valid."""
from __future__ import annotations

from effjax.errors import EffjaxError
from effjax.models import structured

CHOICES = {
    'pos_emb': ('learned', 'rotary', 'none'),
    'norm': ('layernorm', 'rmsnorm'),
    'norm_position': ('pre', 'post'),
    'remat': ('none', 'full', 'dots_saveable', 'dots_with_no_batch_dims_saveable'),
    'share_layers': ('none', 'all', 'groups'),
    'attention_impl': ('xla', 'cudnn'),
    'param_dtype': ('float32', 'bfloat16', 'float16'),
    'dtype': ('float32', 'bfloat16', 'float16'),
    'branch_input': ('split', 'project'),
}


def _positive(m, key):
  value = m[key]
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    raise EffjaxError(f'model.{key}={value!r} is invalid; it must be a positive integer')


def check_model_config(m, families) -> None:
  if m.family not in families:
    raise EffjaxError(f'model.family={m.family!r} is unknown; valid families: {", ".join(families)}')
  kinds = tuple(structured.kinds())
  for key, valid in {**CHOICES, 'mlp_kind': kinds, 'attn_kind': kinds}.items():
    if key in m and m[key] not in valid:
      raise EffjaxError(f'model.{key}={m[key]!r} is invalid; valid values: {", ".join(valid)}')
  for kind in {m[key] for key in ('mlp_kind', 'attn_kind') if key in m}:
    structured.check_options(kind, **structured.kind_options(kind, m))
  for key in ('num_layers', 'd_model', 'num_heads', 'vocab_size', 'max_len', 'mlp_ratio'):
    _positive(m, key)
  if m.d_model % m.num_heads:
    raise EffjaxError(f'model.num_heads={m.num_heads} does not divide model.d_model={m.d_model}; '
                      'choose heads that divide the width')
  if m.pos_emb == 'rotary' and (m.d_model // m.num_heads) % 2:
    raise EffjaxError(f'rotary positions need an even head dim, got d_model/num_heads='
                      f'{m.d_model}/{m.num_heads}={m.d_model // m.num_heads}')
  for key in ('dropout', 'attn_dropout'):
    if not 0.0 <= m[key] < 1.0:
      raise EffjaxError(f'model.{key}={m[key]!r} is invalid; it must be in [0, 1)')
  if m.share_layers == 'groups':
    _positive(m, 'num_groups')
    if m.num_layers % m.num_groups:
      raise EffjaxError(f'model.num_groups={m.num_groups} does not divide model.num_layers={m.num_layers}; '
                        'with share_layers=groups each of the G blocks is applied L/G times')
  e = m.embed_dim
  if not isinstance(e, int) or isinstance(e, bool) or e < 0 or e > m.d_model:
    raise EffjaxError(f'model.embed_dim={e!r} is invalid; use 0 (no factorization) or 1..d_model={m.d_model}')
  from effjax.models import doped  # pylint: disable=import-outside-toplevel
  doped.check(m, m.family)
  _FAMILY_CHECKS.get(m.family, lambda _: None)(m)


def _check_pgpt(m) -> None:
  p = m.num_branches
  if not isinstance(p, int) or isinstance(p, bool) or p < 2:
    raise EffjaxError(f'model.num_branches={p!r} is invalid; p-gpt needs an integer >= 2')
  if m.num_layers % p:
    raise EffjaxError(f'model.num_branches={p} does not divide model.num_layers={m.num_layers}; each of the '
                      'P branches has num_layers/P blocks')
  if m.get('branch_impl', 'vmap') not in ('vmap', 'loop'):
    raise EffjaxError(f'model.branch_impl={m.branch_impl!r} is invalid; valid values: vmap, loop')
  active = m.active_branches
  if isinstance(active, int) or not isinstance(active, (tuple, list)) or not all(
      isinstance(i, int) and not isinstance(i, bool) and 0 <= i < p for i in active) or len(set(active)) != len(
          active):
    raise EffjaxError(f'model.active_branches={active!r} is invalid; give distinct branch indices in 0..{p - 1} '
                      "as a tuple, e.g. '(0,)', or () for all branches")
  if m.branch_input == 'split' and m.tie_embeddings:
    raise EffjaxError(f'model.tie_embeddings=True does not fit branch_input=split (the embedding is '
                      f'num_branches*d_model={p * m.d_model} wide, the head reads d_model={m.d_model}); use '
                      "tie_embeddings=False or branch_input='project'")
  if m.share_layers == 'groups' and (m.num_layers // p) % m.num_groups:
    raise EffjaxError(f'model.num_groups={m.num_groups} does not divide the {m.num_layers // p} blocks of each '
                      'p-gpt branch (num_layers/num_branches)')


def _check_compressed(m) -> None:
  for key in ('compress_every', 'compress_factor', 'conv_kernel'):
    _positive(m, key)
  if m.compress_factor < 2:
    raise EffjaxError(f'model.compress_factor={m.compress_factor} is invalid; it must be >= 2 (each compression '
                      'divides the width by it)')
  width, left, n = m.d_model, m.num_layers, m.compress_every
  while left > 0:
    blocks = min(n, left)
    if width % m.num_heads:
      raise EffjaxError(f'model.num_heads={m.num_heads} does not divide the compressed width {width} '
                        f'(d_model={m.d_model} / compress_factor={m.compress_factor} per {n} blocks); choose '
                        'heads, d_model or compress_factor so every width is a multiple of the heads')
    if m.pos_emb == 'rotary' and (width // m.num_heads) % 2:
      raise EffjaxError(f'rotary positions need an even head dim at every width, got {width}/{m.num_heads}')
    if m.share_layers == 'groups' and blocks % m.num_groups:
      raise EffjaxError(f'model.num_groups={m.num_groups} does not divide the {blocks} blocks at width {width}')
    left -= blocks
    if blocks == n:
      if width % m.compress_factor:
        raise EffjaxError(f'model.compress_factor={m.compress_factor} does not divide the width {width} reached '
                          f'after {m.num_layers - left} blocks (d_model={m.d_model}); use a d_model divisible by '
                          f'compress_factor^{m.num_layers // n}')
      width //= m.compress_factor
  if m.tie_embeddings and width != m.d_model:
    raise EffjaxError(f'model.tie_embeddings=True does not fit {m.family}: the head reads width {width}, the '
                      f'embedding is d_model={m.d_model} wide; use tie_embeddings=False')


_FAMILY_CHECKS = {'pgpt': _check_pgpt, 'lcgpt': _check_compressed, 'ccgpt': _check_compressed}
