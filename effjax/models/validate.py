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
}


def check_positive(m, key):
  """m[key] (a dotted key reads a section: 'compress.conv_kernel') is an integer > 0."""
  value = m
  for part in key.split('.'):
    value = value[part]
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    raise EffjaxError(f'model.{key}={value!r} is invalid; it must be a positive integer')


def check_moved_keys(m) -> None:
  """A key of the older flat layout (model.num_blocks) names where it lives now instead of being ignored."""
  from effjax.configs import base  # pylint: disable=import-outside-toplevel

  for old, new in base.MOVED_MODEL_KEYS.items():
    if old in m and not hasattr(m[old], 'keys'):
      raise EffjaxError(f'model.{old} has moved to model.{new}; set model.{new} instead')


def check_model_config(m, families, vocab_known: bool = True) -> None:
  """Every check of a model config; `vocab_known=False` skips vocab_size (0 until the tokenizer gives it)."""
  check_moved_keys(m)
  if m.family not in families:
    raise EffjaxError(f'model.family={m.family!r} is unknown; valid families: {", ".join(families)}')
  kinds = tuple(structured.kinds())
  for key, valid in {**CHOICES, 'mlp_kind': kinds, 'attn_kind': kinds}.items():
    if key in m and m[key] not in valid:
      raise EffjaxError(f'model.{key}={m[key]!r} is invalid; valid values: {", ".join(valid)}')
  for kind in {m[key] for key in ('mlp_kind', 'attn_kind') if key in m}:
    structured.check_options(kind, **structured.kind_options(kind, m))
  for key in ('num_layers', 'd_model', 'num_heads', *(('vocab_size',) if vocab_known else ()), 'max_len', 'mlp_ratio'):
    check_positive(m, key)
  if m.d_model % m.num_heads:
    raise EffjaxError(
      f'model.num_heads={m.num_heads} does not divide model.d_model={m.d_model}; choose heads that divide the width'
    )
  if m.pos_emb == 'rotary' and (m.d_model // m.num_heads) % 2:
    raise EffjaxError(
      f'rotary positions need an even head dim, got d_model/num_heads='
      f'{m.d_model}/{m.num_heads}={m.d_model // m.num_heads}'
    )
  for key in ('dropout', 'attn_dropout'):
    if not 0.0 <= m[key] < 1.0:
      raise EffjaxError(f'model.{key}={m[key]!r} is invalid; it must be in [0, 1)')
  if m.share_layers == 'groups':
    check_positive(m, 'num_groups')
    if m.num_layers % m.num_groups:
      raise EffjaxError(
        f'model.num_groups={m.num_groups} does not divide model.num_layers={m.num_layers}; '
        'with share_layers=groups each of the G blocks is applied L/G times'
      )
  e = m.embed_dim
  if not isinstance(e, int) or isinstance(e, bool) or e < 0 or e > m.d_model:
    raise EffjaxError(f'model.embed_dim={e!r} is invalid; use 0 (no factorization) or 1..d_model={m.d_model}')
  from effjax.models import doped, family  # pylint: disable=import-outside-toplevel

  doped.check(m, m.family)
  check = family(m.family).check
  if check is not None:
    check(m)
