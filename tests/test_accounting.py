"""Accounting (seed 004): parameter counts of the seed's presets derived here from the architecture, emulated
params, forward FLOPs with frozen MLPs and structured layers, and compute C = (6·N_trainable + 4·N_frozen)·B·S."""

import jax
import ml_collections
import numpy as np
import pytest

from effjax.configs import blockdiag as blockdiag_config
from effjax.configs import doped as doped_config
from effjax.configs import fastfood as fastfood_config
from effjax.configs import gpt as gpt_config
from effjax import accounting, state as state_lib
from effjax.models import structured

V_BPE = 50262  # the seed's byte-level BPE vocabulary


def dense_block(d):
  """Pre-LN block with biases: QKV+out 4(d² + d), MLP d·4d + 4d + 4d·d + d, two LayerNorms 4d."""
  return 12 * d * d + 13 * d


def fastfood_block(d):
  """Dense attention; the MLP's fc (d -> 4d: 4 blocks of n=d) and proj (4d -> d: one block of n=4d, truncated)
  each hold 3 diagonals per block of size n: 3·4d + 3·4d, plus biases 4d + d; LayerNorms 4d."""
  return (4 * d * d + 4 * d) + (12 * d + 4 * d) + (12 * d + d) + 4 * d


def blockdiag_block(d, nb=4):
  """Dense attention; both MLP kernels block-diagonal with nb blocks: 2·(4d²)/nb, plus biases and LayerNorms."""
  return (4 * d * d + 4 * d) + 8 * d * d // nb + 5 * d + 4 * d


def lighton_counts(trainable_blocks, d, block, frozen_layers=0):
  """Rotary (no position table), tied head: embedding V·d; final LayerNorm 2d; a frozen MLP 2·6d·d."""
  embedding = V_BPE * d
  non_embedding = trainable_blocks * block(d) + 2 * d
  frozen = frozen_layers * 12 * d * d
  return {
    'embedding_params': embedding,
    'non_embedding_trainable_params': non_embedding,
    'trainable_params': embedding + non_embedding,
    'frozen_params': frozen,
    'total_params': embedding + non_embedding + frozen,
  }


SEED_PRESETS = {
  # (config module, preset): (trainable blocks, d_model, block formula, frozen layers)
  (gpt_config, 'xxsmall'): (3, 768, dense_block, 0),
  (gpt_config, 'xsmall'): (6, 768, dense_block, 0),
  (gpt_config, 'small'): (12, 768, dense_block, 0),
  (gpt_config, 'medium'): (24, 1024, dense_block, 0),
  (doped_config, 'xsmall'): (3, 768, dense_block, 2),
  (doped_config, 'small'): (6, 768, dense_block, 5),
  (doped_config, 'medium'): (12, 1024, dense_block, 11),
  (fastfood_config, 'paper'): (12, 1024, fastfood_block, 0),
  (blockdiag_config, 'paper'): (12, 1024, blockdiag_block, 0),
}


@pytest.mark.parametrize('module,preset', list(SEED_PRESETS), ids=lambda x: getattr(x, '__name__', x))
def test_seed_preset_param_counts_match_the_architecture(module, preset):
  blocks, d, block, frozen_layers = SEED_PRESETS[(module, preset)]
  counts = accounting.param_counts(module.get_config(preset).model)
  expected = lighton_counts(blocks, d, block, frozen_layers)
  assert {k: counts[k] for k in expected} == expected


def test_seed_doped_presets_have_the_seed_layer_counts():
  for preset, (trainable, frozen) in {'xsmall': (3, 2), 'small': (6, 5), 'medium': (12, 11)}.items():
    s = accounting.summarize(doped_config.get_config(preset))
    assert (s['trainable_layers'], s['frozen_layers'], s['total_layers']) == (trainable, frozen, trainable + frozen)


def test_doped_trainable_params_equal_the_baseline_with_as_many_blocks():
  """Doped XSmall / Small train exactly what the XXSmall / XSmall baselines train; the rest is frozen."""
  for doped_preset, baseline in (('xsmall', 'xxsmall'), ('small', 'xsmall')):
    doped = accounting.param_counts(doped_config.get_config(doped_preset).model)
    base = accounting.param_counts(gpt_config.get_config(baseline).model)
    assert doped['trainable_params'] == base['trainable_params']
    assert doped['frozen_params'] > 0 and base['frozen_params'] == 0


def test_emulated_params():
  """Doped: every stored weight counts (frozen included); structured: the dense model they stand in for."""
  d = 1024
  doped = accounting.param_counts(doped_config.get_config('medium').model)
  assert accounting.emulated_params(doped_config.get_config('medium').model) == doped['total_params']
  dense_12x1024 = lighton_counts(12, d, dense_block)['total_params']
  for module in (fastfood_config, blockdiag_config):
    m = module.get_config('paper').model
    assert accounting.emulated_params(m) == dense_12x1024
    assert accounting.param_counts(m)['total_params'] < dense_12x1024


def test_step_compute_counts_frozen_params_at_two_thirds():
  c = doped_config.get_config('xsmall')
  expected = lighton_counts(3, 768, dense_block, 2)
  tokens = 80 * 1024
  n, f = expected['non_embedding_trainable_params'], expected['frozen_params']
  assert accounting.step_compute(c) == {'compute': (6 * n + 4 * f) * tokens, 'compute_frozen_free': 6 * n * tokens}
  s = accounting.summarize(c)
  assert s['step_compute'] == (6 * n + 4 * f) * tokens
  assert s['compute_total'] == (6 * n + 4 * f) * tokens * c.train.steps
  assert s['compute_frozen_free_total'] == 6 * n * tokens * c.train.steps
  base = accounting.step_compute(gpt_config.get_config('xxsmall'))  # no frozen params: both accountings agree
  assert base['compute'] == base['compute_frozen_free'] == 6 * n * tokens


def test_forward_flops_include_the_frozen_mlps():
  """Each frozen MLP adds its two matmuls, 2·(2·6d·d) per token; training it costs 2/3 of a trainable weight."""
  for doped_preset, baseline, frozen_layers, d in (('xsmall', 'xxsmall', 2, 768), ('small', 'xsmall', 5, 768)):
    c = doped_config.get_config(doped_preset)
    doped = accounting.flops_per_token(c.model, 1024)
    base = accounting.flops_per_token(gpt_config.get_config(baseline).model, 1024)
    assert doped - base == frozen_layers * 2 * (2 * 6 * d * d)
    s = accounting.summarize(c)
    assert s['flops_per_token'] == doped
    assert s['train_flops_per_token'] == 3 * base + 2 * (doped - base)


def test_dense_forward_flops_formula():
  """XXSmall: per block 24d² (matmuls) + 4·S·d (attention over S positions); tied head 2·d·V."""
  d, s = 768, 1024
  expected = 3 * (24 * d * d + 4 * s * d) + 2 * d * V_BPE
  assert accounting.flops_per_token(gpt_config.get_config('xxsmall').model, s) == expected


@pytest.mark.parametrize('module,kind', [(fastfood_config, 'fastfood'), (blockdiag_config, 'blockdiag')])
def test_structured_forward_flops_replace_only_the_mlp_matmuls(module, kind):
  """The structured model costs the dense one minus, per block, the dense MLP matmuls (16d²) plus the structured
  layers' own cost; attention stays dense."""
  m = module.get_config('paper').model
  d, s = m.d_model, 1024
  dense = ml_collections.ConfigDict({**m.to_dict(), 'mlp_kind': 'dense'})
  opts = structured.kind_options(kind, m)  # blockdiag: num_blocks and where the block-Hadamard goes
  mlp = structured.dense_flops(kind, d, 4 * d, **opts) + structured.dense_flops(kind, 4 * d, d, **opts)
  assert 0 < mlp < 16 * d * d
  assert accounting.flops_per_token(m, s) == accounting.flops_per_token(dense, s) - m.num_layers * (16 * d * d - mlp)


@pytest.mark.parametrize('module', [doped_config, fastfood_config, blockdiag_config])
def test_optimizer_state_is_two_adam_moments_of_the_trainable_params(module):
  """Adam's mu and nu mirror `params` leaf for leaf: 2 x the trainable bytes, nothing for frozen weights."""
  c = module.get_config('tiny')
  c.model.vocab_size = 64
  abstract = state_lib.make_setup(c).abstract_state
  adam = [x for x in jax.tree.leaves(abstract.opt_state, is_leaf=lambda x: hasattr(x, 'mu')) if hasattr(x, 'mu')]
  assert len(adam) == 1
  nbytes = lambda tree: sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
  assert nbytes(adam[0].mu) + nbytes(adam[0].nu) == 2 * nbytes(abstract.params)
  counts = accounting.param_counts(c.model)
  assert nbytes(abstract.params) == 4 * counts['trainable_params']
  assert sum(x.size for x in jax.tree.leaves(abstract.extra.get('frozen', {}))) == counts['frozen_params']
  assert (counts['frozen_params'] > 0) == (module is doped_config)


@pytest.mark.parametrize('module', [doped_config, fastfood_config, blockdiag_config])
def test_cpu_presets_build(module):
  for preset in ('', 'tiny'):
    c = module.get_config(preset)
    c.model.vocab_size = 100
    counts = accounting.param_counts(c.model)
    assert counts['trainable_params'] > 0


def test_a_start_builds_and_eval_shapes_the_model_once():
  """Training setup, memory planning and the summary share one abstract model per distinct model config (a
  structured model's dense stand-in for emulated_params would be a second one; this one is dense already)."""
  from effjax import memory  # pylint: disable=import-outside-toplevel

  c = gpt_config.get_config('tiny')
  c.model.vocab_size = 50
  state_lib._abstract.cache_clear()  # pylint: disable=protected-access
  state_lib.make_setup(c, devices=jax.devices()[:1])
  memory.plan(c, 1)
  accounting.summarize(c)
  assert state_lib._abstract.cache_info().misses == 1  # pylint: disable=protected-access
