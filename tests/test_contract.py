"""One contract, every family: each built-in variant's `tiny` preset (plus the GPT's rotary and post-LN forms) is
causal, decodes with its KV cache exactly as a full forward pass, reports the parameters it creates, (where the
export layouts map its stack) computes the same with its layers scanned or unrolled, resumes bit-identically and
trains to the same losses on 1 device as on a data x fsdp x tensor mesh of 8."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from effjax import accounting, checkpoint, config_lookup, sample, state, train
from effjax.errors import EffjaxError
from effjax.models import build_model, layers
from tests.helpers import assert_causal, one_device, set_dotted, train_losses

VOCAB = 50
# Every variant's tiny preset, and the forms of a family that change its wiring: rotary / post-LN GPT, p-gpt's
# projected branch inputs (pre-LN) and its Python loop of branches, cc-gpt's kernel-3 convolution (pre- and
# post-LN), grouped Efficio sharing with rotary positions and an untied head.
CASES = [(name, {}) for name in config_lookup.variants()] + [
  ('gpt', {'pos_emb': 'rotary'}),
  ('gpt', {'norm_position': 'post'}),
  ('pgpt', {'pgpt.branch_input': 'project', 'norm_position': 'pre'}),
  ('pgpt', {'pgpt.branch_impl': 'loop'}),
  ('ccgpt', {'compress.conv_kernel': 3}),
  ('ccgpt', {'compress.conv_kernel': 3, 'norm_position': 'pre'}),
  ('efficio', {'share_layers': 'groups', 'num_groups': 2, 'pos_emb': 'rotary', 'tie_embeddings': False}),
]
IDS = [name + ''.join(f'-{k.split(".")[-1]}={v}' for k, v in extra.items()) for name, extra in CASES]


def tiered(cases, ids, fast: set):
  """`cases` as pytest params, those whose id is not in `fast` marked slow: `make test` checks the property on
  the named forms, `make test-slow` (and CI) on all the others."""
  return [pytest.param(*c, id=i, marks=() if i in fast else pytest.mark.slow) for c, i in zip(cases, ids)]


def _model_config(name, extra, **overrides) -> ml_collections.ConfigDict:
  """The variant's tiny model config with `extra` (dotted keys reach into sections: 'pgpt.branch_impl')."""
  m = config_lookup._builtin_module(name).get_config('tiny').model  # pylint: disable=protected-access
  return set_dotted(m, {'vocab_size': VOCAB, **extra, **overrides})


def _init(m, length=12):
  """The model and its variables (no cache), initialised in one compiled call."""
  model = build_model(m)
  variables = dict(jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, length), jnp.int32)))())
  variables.pop('cache', None)
  return model, nn.unbox(variables)


@pytest.mark.parametrize('name,extra', CASES, ids=IDS)
def test_causal(name, extra):
  """Changing the token at position t' changes no logit before t' and the logits at t' and after: one forward
  pass over the sequence and its copies with one position changed (t' = 0, 5, 11)."""
  model, variables = _init(_model_config(name, extra))
  assert_causal(model, variables, jnp.arange(12, dtype=jnp.int32) + 3)


@pytest.mark.parametrize(
  'name,extra', tiered(CASES, IDS, {'gpt', 'gpt-pos_emb=rotary', 'pgpt', 'lcgpt', 'doped', 'efficio', 'lowrank'})
)
def test_kv_cache_equals_full_recompute(name, extra):
  """Token-by-token decoding through the cache gives the full forward pass's logits at every position."""
  model, variables = _init(_model_config(name, extra))
  seq_BxT = jax.random.randint(jax.random.key(4), (2, 10), 0, VOCAB)
  full_BxTxV = model.apply(variables, seq_BxT)
  cache = jax.tree.map(jnp.zeros_like, model.init(jax.random.key(0), seq_BxT[:, :1], decode=True)['cache'])

  @jax.jit
  def step(cache, token_Bx1):
    logits, mutated = model.apply({**variables, 'cache': cache}, token_Bx1, decode=True, mutable=['cache'])
    return mutated['cache'], logits[:, 0]

  steps = []
  for i in range(seq_BxT.shape[1]):
    cache, logits_BxV = step(cache, seq_BxT[:, i : i + 1])
    steps.append(logits_BxV)
  np.testing.assert_allclose(np.asarray(jnp.stack(steps, 1)), np.asarray(full_BxTxV), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize('name,extra', tiered(CASES, IDS, {'gpt'}))
def test_cached_greedy_generation_equals_uncached(name, extra):
  """The sampler's decode path (a cache of prompt + new tokens, a scanned stack relaid out unrolled where it maps)
  draws the greedy tokens of the uncached full recompute; the relayout keeps every weight."""
  m = _model_config(name, extra)
  model, variables = _init(m)
  prompt_BxP = jax.random.randint(jax.random.key(5), (2, 5), 0, VOCAB)
  args = dict(max_new_tokens=7, temperature=0.0)
  cached = sample.generate_cached(model, variables, prompt_BxP, jax.random.key(0), **args)
  uncached = sample.generate_uncached(model, variables, prompt_BxP, jax.random.key(0), **args)
  np.testing.assert_array_equal(np.asarray(cached), np.asarray(uncached))
  decoding, relaid = sample.decoding_layout(model, variables)
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  assert count(relaid) == count(variables)
  assert layers.out_major(decoding.cfg)  # on CPU every family's plain dense kernels are relaid out [out, in]
  if name == 'gpt' and m.share_layers == 'none':
    assert m.scan_layers and not decoding.cfg.scan_layers


@pytest.mark.parametrize('name,extra', CASES, ids=IDS)
def test_summary_counts_the_parameters_it_creates(name, extra):
  m = _model_config(name, extra)
  _, variables = _init(m)
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  config = config_lookup._builtin_module(name).get_config('tiny')  # pylint: disable=protected-access
  config.model = m
  summary = accounting.summarize(config)
  assert summary['trainable_params'] == count(variables['params'])
  assert summary['frozen_params'] == count(variables.get('frozen', {}))
  assert summary['total_params'] == summary['trainable_params'] + summary['frozen_params']
  assert summary['embedding_params'] + summary['non_embedding_trainable_params'] == summary['trainable_params']
  assert summary['flops_per_token'] > 2 * summary['non_embedding_trainable_params'] // max(m.num_layers, 1) > 0


def _fixed_depth(m) -> bool:
  """Presets whose depth is tied to other keys (sharing groups, doping patterns) keep their own num_layers."""
  return m.share_layers == 'groups' or bool(m.doping.pattern)


def _relayout_maps(name, extra) -> bool:
  """Whether checkpoint.relayout maps this stack to the unrolled layout (it refuses nested or segmented ones)."""
  m = _model_config(name, extra)
  try:
    jax.eval_shape(lambda v: checkpoint.relayout(v, m, 'unscanned')[0], state.abstract_variables(m))
  except EffjaxError:
    return False
  return True


SCAN_CASES = [case for case in CASES if _relayout_maps(*case)]


@pytest.mark.parametrize('name,extra', SCAN_CASES, ids=[IDS[CASES.index(c)] for c in SCAN_CASES])
def test_scanned_equals_unrolled(name, extra):
  """The same weights in the unrolled layout (checkpoint.relayout) give the same logits."""
  m = _model_config(name, extra)
  if not _fixed_depth(m):
    m.num_layers = 3
  model, variables = _init(m)
  unrolled_vars, unrolled_config = checkpoint.relayout(variables, m, 'unscanned')
  tokens_BxT = jax.random.randint(jax.random.key(2), (2, 12), 0, VOCAB)
  a = model.apply(variables, tokens_BxT)
  b = build_model(unrolled_config).apply(unrolled_vars, tokens_BxT)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def _run_config(name, corpus, stop_at=6):
  """The tiny preset's first 6 of 7 steps on the test corpus (stopping before train.steps skips the final
  evaluation: one compile less): dropout on and 2 micro-batches per step, so the dropout keys and the
  accumulation are part of what must resume exactly."""
  c = config_lookup._builtin_module(name).get_config('tiny')  # pylint: disable=protected-access
  c.data.update(corpus=corpus, tokenizer='char')
  c.model.dropout = 0.1
  c.train.update(steps=7, stop_at=stop_at, log_every=1, eval_every=100, eval_batches=1, grad_accum=2)
  c.checkpoint.every = 3
  return c


@pytest.mark.parametrize('name', tiered([(n,) for n in config_lookup.variants()], config_lookup.variants(), {'gpt'}))
def test_resume_is_bit_identical_and_one_device_equals_eight(tmp_path, corpus_dir, name):
  """On data=2 x fsdp=2 x tensor=2: 6 straight steps == 3 steps, stop, resume to 6 (bit for bit); the same run on
  1 device gives the same losses (tol 1e-5)."""
  mesh8 = dict(data=2, fsdp=2, tensor=2)
  straight = _run_config(name, corpus_dir)
  straight.mesh.update(**mesh8)
  train.train_and_evaluate(straight, str(tmp_path / 'straight'), progress=False)
  for label in ('resumed', 'one'):  # the same token cache: no re-tokenizing
    os.makedirs(tmp_path / label)
    os.symlink(tmp_path / 'straight' / 'data', tmp_path / label / 'data')
  interrupted = _run_config(name, corpus_dir, stop_at=3)
  interrupted.mesh.update(**mesh8)
  train.train_and_evaluate(interrupted, str(tmp_path / 'resumed'), progress=False)
  assert max(train_losses(tmp_path / 'resumed')) == 3
  train.train_and_evaluate(straight, str(tmp_path / 'resumed'), progress=False)
  expected, resumed = train_losses(tmp_path / 'straight'), train_losses(tmp_path / 'resumed')
  assert sorted(expected) == list(range(1, 7)) and all(np.isfinite(list(expected.values())))
  assert [expected[s] for s in range(1, 7)] == [resumed[s] for s in range(1, 7)]

  one = _run_config(name, corpus_dir)
  one.mesh.update(data=1, fsdp=1, tensor=1)
  train.train_and_evaluate(one, str(tmp_path / 'one'), devices=one_device(), progress=False)
  single = train_losses(tmp_path / 'one')
  np.testing.assert_allclose([single[s] for s in range(1, 7)], [expected[s] for s in range(1, 7)], atol=1e-5)
