"""The optimizer: AdamW with linear warmup + cosine decay, global-norm clipping and a weight-decay mask.

Only `params` reach the optimizer; frozen (doped) weights live in another variable collection, so they have no
optimizer state at all.
"""

from __future__ import annotations

import jax
import optax

from effjax.errors import EffjaxError
from effjax.models import structured

EMBEDDING_NAMES = ('embedding', 'pos_embedding', 'projection')


def learning_rate_schedule(tc) -> optax.Schedule:
  warmup = max(int(tc.warmup_steps), 0)
  if tc.lr_schedule == 'constant':
    main = optax.constant_schedule(tc.lr)
  elif tc.lr_schedule == 'cosine':
    main = optax.cosine_decay_schedule(tc.lr, max(tc.steps - warmup, 1), alpha=tc.min_lr_ratio)
  else:
    raise EffjaxError(f"train.lr_schedule={tc.lr_schedule!r} is invalid; valid values: 'cosine', 'constant'")
  if not warmup:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, tc.lr, warmup), main], [warmup])


def decay_mask(params, decay_embeddings: bool = False):
  """Weight decay on matrices only (the leaves each dense kind declares as such, structured.DenseKind.decayed):
  not on norms, biases or diagonals, nor embeddings unless asked."""
  matrices = structured.decayed_leaf_names()

  def wants_decay(path, _):
    name = getattr(path[-1], 'key', str(path[-1]))
    return name in matrices or (decay_embeddings and name in EMBEDDING_NAMES)

  return jax.tree_util.tree_map_with_path(wants_decay, params)


def make_optimizer(tc) -> optax.GradientTransformation:
  if tc.lr <= 0:
    raise EffjaxError(f'train.lr={tc.lr!r} is invalid; it must be > 0')
  parts = []
  if tc.grad_clip and tc.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(tc.grad_clip))
  parts.append(
    optax.adamw(
      learning_rate_schedule(tc),
      b1=tc.b1,
      b2=tc.b2,
      eps=tc.eps,
      weight_decay=tc.weight_decay,
      mask=lambda p: decay_mask(p, tc.decay_embeddings),
    )
  )
  return optax.chain(*parts)
