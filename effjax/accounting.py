"""Parameter, byte, FLOP and compute accounting, from the abstract model (jax.eval_shape: no allocation, so a
billion-parameter config is summarised in seconds).

Conventions (Kaplan et al.; the LightOn seed): embedding params are the token/position tables, a factorized
embedding's projection, and an untied output head; N is the trainable non-embedding count, each parameter
counted once per application (a GPT-Efficio block shared across L layers counts L times: C measures work, not
storage; without sharing this is the plain count); training compute is
C = (6·N_trainable + 4·N_frozen)·B·S (a frozen weight needs no weight gradient: 2/3 of the cost), and the second
accounting treats frozen params as free: C = 6·N_trainable·B·S. `flops_per_token` is the real forward cost of
the network as built (attention over the full context, structured layers at their true O(n log n) cost, a shared
block counted once per application). `train_flops_per_token` = 3·forward − 2·N_frozen, the same 2/3 rule applied
to the real forward cost (each frozen weight is used once per token, as in a doped model's frozen MLPs).
"""

from __future__ import annotations

import math

import jax
import ml_collections
import numpy as np

from effjax import state
from effjax.models import family, structured

EMBEDDING_MODULES = ('embed', 'head')


def _count(tree) -> int:
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def _bytes(tree) -> int:
  return int(sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def param_counts(model_config) -> dict:
  variables = state.abstract_variables(model_config)
  params, frozen = variables.get('params', {}), variables.get('frozen', {})
  embedding = _count({k: v for k, v in params.items() if k in EMBEDDING_MODULES})
  trainable = _count(params)
  return {
    'applied_non_embedding_params': trainable - embedding + _extra_applications(model_config, params),
    'total_params': trainable + _count(frozen),
    'trainable_params': trainable,
    'frozen_params': _count(frozen),
    'embedding_params': embedding,
    'non_embedding_trainable_params': trainable - embedding,
    'param_bytes': _bytes(params) + _bytes(frozen),
  }


def _extra_applications(model_config, params) -> int:
  """A block shared across L layers is stored once but applied L times: compute must count each application."""
  share = model_config.get('share_layers', 'none')
  if share == 'none' or 'stack' not in params:
    return 0
  unique = 1 if share == 'all' else model_config.num_groups
  return _count(params['stack']) * (model_config.num_layers - unique) // unique


def emulated_params(model_config) -> int:
  """The parameter count of the dense model that structured layers stand in for (frozen weights included)."""
  dense = ml_collections.ConfigDict(model_config.to_dict())
  dense.mlp_kind = dense.attn_kind = structured.PLAIN
  return param_counts(dense)['total_params']


def flops_per_token(model_config, seq_len: int) -> int:
  """Forward FLOPs per token of the network as built (each family's module knows its own structure)."""
  model, _ = state.abstract_model(model_config)
  return int(family(model_config.family).forward_flops(model.cfg, seq_len))


def step_compute(config) -> dict:
  """Training compute of one step (B·S tokens) under both accountings."""
  counts = param_counts(config.model)
  tokens = config.train.batch_size * config.data.seq_len
  n_train = counts['applied_non_embedding_params']
  return {'compute': (6 * n_train + 4 * counts['frozen_params']) * tokens, 'compute_frozen_free': 6 * n_train * tokens}


def summarize(config) -> dict:
  """Everything `--mode=summary` reports; families may add their own keys (`summary_extras`)."""
  m = config.model
  counts = param_counts(m)
  compute = step_compute(config)
  fwd = flops_per_token(m, config.data.seq_len)
  summary = {
    'family': m.family,
    **counts,
    'param_mb': round(counts['total_params'] * 4 / 2**20, 2),
    'emulated_params': emulated_params(m),
    'flops_per_token': fwd,
    # forward + backward; a frozen weight needs no weight gradient: 4 FLOPs per token instead of 6
    'train_flops_per_token': 3 * fwd - 2 * counts['frozen_params'],
    'seq_len': config.data.seq_len,
    **{f'step_{k}': v for k, v in compute.items()},
    'compute_total': compute['compute'] * config.train.steps,
    'compute_frozen_free_total': compute['compute_frozen_free'] * config.train.steps,
  }
  model, _ = state.abstract_model(m)
  extras = family(m.family).summary_extras
  if extras is not None:
    summary.update(extras(model.cfg, state.abstract_variables(m)))
  return summary


def format_table(summary: dict) -> str:
  width = max(map(len, summary))
  lines = []
  for key, value in summary.items():
    if key.endswith('_mb'):
      shown = f'{value:.2f}'
    else:
      shown = f'{value:,}' if isinstance(value, int) else (f'{value:.4g}' if isinstance(value, float) else value)
    lines.append(f'{key:<{width}}  {shown}')
  return '\n'.join(lines)
