"""p-gpt: the paper's parameter counts, causality, selective inference (any branch subset, renormalised weights),
vmap == loop, KV cache with subsets, a checkpoint evaluated with any subset and the CLI."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from effjax.configs import gpt as gpt_config
from effjax.configs import pgpt
from effjax import accounting, modes, sample, train
from effjax.data import pipeline
from effjax.errors import EffjaxError
from effjax.models import build_model, layers, parallel
from tests.helpers import close, one_device, run_cli, variant_config

V = 50


def model_config(**overrides):
  m = pgpt.get_config('tiny').model
  m.update(vocab_size=V, num_layers=3, pgpt=dict(num_branches=3))
  m.update(overrides)
  return m


def variant(m, **overrides):
  out = ml_collections.ConfigDict(m.to_dict())
  out.update(overrides)
  return out


def init(m, seed=0, length=16):
  model = build_model(m)
  variables = nn.unbox(jax.jit(model.init)(jax.random.key(seed), jnp.zeros((2, length), jnp.int32)))
  # distinct mixing weights, so a wrong renormalisation cannot pass by symmetry
  logits = jnp.linspace(-0.7, 0.9, m.pgpt.num_branches)
  return model, {**variables, 'params': {**variables['params'], 'branch_logits': logits}}


def run_config(corpus, **overrides):
  return variant_config(pgpt, corpus, **overrides)


# ---------------------------------------------------------------------------------------------------------
# configs and the paper's counts


def test_presets_build_and_unknown_preset_is_an_error():
  for preset in ('', 'tiny', 'project', 'paper', 'paper_1', 'published', 'published_1'):
    c = pgpt.get_config(preset)
    c.model.vocab_size = c.model.vocab_size or 100
    build_model(c.model)
  assert pgpt.get_config('project').model.pgpt.branch_input == 'project'
  with pytest.raises(EffjaxError, match="unknown preset 'nope' for configs/pgpt.py"):
    pgpt.get_config('nope')


def test_paper_param_counts_exact():
  """GPT 8.82 M / 33.66 MB; p-gpt 9.73 M total; p-gpt-1 6.19 M / 23.60 MB (the paper's table)."""
  base = accounting.summarize(gpt_config.get_config('paper_pgpt_baseline'))
  assert (base['total_params'], base['param_mb']) == (8_823_364, 33.66)
  full = accounting.summarize(pgpt.get_config('paper'))
  assert full['total_params'] == 9_734_982 and full['active_params'] == 9_734_982
  assert (full['single_branch_params'], full['single_branch_param_mb']) == (6_186_054, 23.60)
  one = accounting.summarize(pgpt.get_config('paper_1'))
  assert one['total_params'] == 9_734_982
  assert (one['active_params'], one['active_param_mb']) == (6_186_054, 23.60)
  assert one['params_per_branch'] == 2 * 1_774_464
  assert one['active_params_sliced_embedding'] == 6_186_054 - (2116 + 256) * 384
  # the forward pass of one branch costs half the blocks of both
  blocks = lambda s: s['flops_per_token'] - 2 * 384 * 2116
  assert blocks(full) == 2 * blocks(one)


def test_published_architecture_counts_exact():
  """The authors' April 2024 code: no norm after the mix, one scalar weight: 9,734,213 / 6,185,285 / 23.59 MB."""
  full = accounting.summarize(pgpt.get_config('published'))
  assert full['total_params'] == 9_734_213 == 9_734_982 - 768 - 2 + 1
  assert (full['single_branch_params'], full['single_branch_param_mb']) == (6_185_285, 23.59)
  one = accounting.summarize(pgpt.get_config('published_1'))
  assert (one['active_params'], one['active_param_mb']) == (6_185_285, 23.59)


def test_scalar_mix_keeps_the_trained_weight_of_a_subset():
  """branch_mix='scalar': y = w·y_0 + (1-w)·y_1; a subset is not renormalised (the authors' p-gpt-1 rule scales
  the kept branch by its weight), and strongest_branch picks the branch with weight >= 0.5."""
  m = model_config(num_layers=2, final_norm=False, pgpt=dict(num_branches=2, branch_mix='scalar'))
  model = build_model(m)
  variables = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((2, 16), jnp.int32)))
  assert variables['params']['branch_weight'].shape == () and 'branch_logits' not in variables['params']
  assert float(variables['params']['branch_weight']) == 0.5
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, V, (2, 16)))
  with_w = lambda w: {**variables, 'params': {**variables['params'], 'branch_weight': jnp.float32(w)}}
  first = build_model(variant(m, pgpt=dict(active_branches=(0,))))
  # weight 1 on branch 0: the full network is branch 0 alone
  close(model.apply(with_w(1.0), tokens), first.apply(with_w(1.0), tokens))
  # weight 0.7: branch 0 alone is scaled by 0.7, not renormalised to 1
  assert not np.allclose(first.apply(with_w(0.7), tokens), first.apply(with_w(1.0), tokens), atol=1e-3)
  assert parallel.strongest_branch(with_w(0.7)['params']) == 0
  assert parallel.strongest_branch(with_w(0.3)['params']) == 1
  np.testing.assert_allclose(parallel.branch_weights(with_w(0.3)['params']), [0.3, 0.7], rtol=1e-6)


def test_project_form_counts():
  """Shared d-wide embedding + a d×d projection (with bias) per branch."""
  m = model_config(pgpt=dict(branch_input='project'))
  split = accounting.param_counts(variant(m, pgpt=dict(branch_input='split')))['total_params']
  proj = accounting.param_counts(m)['total_params']
  d, p = m.d_model, m.pgpt.num_branches
  assert proj - split == p * (d * d + d) - (p - 1) * d * (V + m.max_len)


# ---------------------------------------------------------------------------------------------------------
# numerics


def _branch_alone(m, params, i, tokens):
  """Branch i by hand: embedding (its channel slice, or P_i·x), its LayerStack, ln_f and the head."""
  cfg = ml_collections.FrozenConfigDict(m)
  d = cfg.d_model
  positions = jnp.arange(tokens.shape[1])
  width = cfg.pgpt.num_branches * d if cfg.pgpt.branch_input == 'split' else d
  x = layers.Embedder(cfg, width).apply({'params': params['embed']}, tokens, positions)
  branch = jax.tree.map(lambda a: a[i], params['branches'])
  if cfg.pgpt.branch_input == 'split':
    x = x[..., i * d : (i + 1) * d]
  else:
    x = nn.Dense(d).apply({'params': branch['proj']}, x)
  depth = cfg.num_layers // cfg.pgpt.num_branches
  stack = layers.LayerStack(
    layers.Block, dict(cfg=cfg, d_model=d, num_heads=cfg.num_heads, num_layers=depth), num_layers=depth
  )
  y = stack.apply({'params': branch['stack']}, x, positions)
  if cfg.final_norm:
    y = layers.make_norm(cfg, 'ln_f').apply({'params': params['ln_f']}, y)
  return nn.Dense(cfg.vocab_size).apply({'params': params['head']['head']}, y)


@pytest.mark.slow
@pytest.mark.parametrize('form', ['split', 'project'])
def test_one_branch_inference_equals_that_branch_alone(form):
  """active_branches=(i,) renormalises the mixing weights to exactly 1 for branch i: the output is branch i
  alone, computed here by hand from the same params; a pair mixes with softmax over the pair only."""
  m = model_config(pgpt=dict(branch_input=form))
  _, variables = init(m)
  params = variables['params']
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, V)
  alone = {i: _branch_alone(m, params, i, tokens) for i in range(3)}
  for i in range(3):
    close(build_model(variant(m, pgpt=dict(active_branches=(i,)))).apply(variables, tokens), alone[i])
  # two branches: y = softmax(w_0, w_2)·(y_0, y_2) before ln_f/head; check through the loop implementation
  pair = build_model(variant(m, pgpt=dict(active_branches=(2, 0)))).apply(variables, tokens)
  loop = build_model(variant(m, pgpt=dict(active_branches=(0, 2), branch_impl='loop')))
  close(pair, loop.apply({'params': parallel.unstack_branches(params)}, tokens))
  full = build_model(m).apply(variables, tokens)
  assert float(jnp.abs(full - pair).max()) > 1e-3 and float(jnp.abs(full - alone[0]).max()) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize('form', ['split', 'project'])
def test_vmap_equals_loop_values_and_grads(form):
  m = model_config(dropout=0.0, pgpt=dict(branch_input=form))
  model, variables = init(m)
  loop = build_model(variant(m, pgpt=dict(branch_impl='loop')))
  loop_params = parallel.unstack_branches(variables['params'])
  expected = jax.eval_shape(lambda: nn.unbox(loop.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))))
  assert jax.tree.structure(expected['params']) == jax.tree.structure(loop_params)
  tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, V)
  loss = lambda mod, p: mod.apply({'params': p}, tokens).mean()
  close(model.apply(variables, tokens), loop.apply({'params': loop_params}, tokens))
  g_vmap = jax.grad(lambda p: loss(model, p))(variables['params'])
  g_loop = jax.grad(lambda p: loss(loop, p))(loop_params)
  jax.tree.map(lambda a, b: close(a, b, atol=1e-6), g_vmap, parallel.stack_branches(g_loop))


def test_inactive_branches_get_no_gradient_and_cost_no_flops():
  m = model_config(pgpt=dict(active_branches=(1,)))
  model, variables = init(m)
  tokens = jax.random.randint(jax.random.key(3), (2, 12), 0, V)
  grads = jax.grad(lambda p: model.apply({'params': p}, tokens).mean())(variables['params'])
  per_branch = jax.tree.leaves(jax.tree.map(lambda g: jnp.abs(g).reshape(3, -1).sum(-1), grads['branches']))
  totals = np.sum([np.asarray(x) for x in per_branch], axis=0)
  assert totals[0] == 0 and totals[2] == 0 and totals[1] > 0
  flops = {k: accounting.flops_per_token(variant(m, pgpt=dict(active_branches=a)), 16) for k, a in ((1, (1,)), (3, ()))}
  head = 2 * m.d_model * V
  assert flops[3] - head == 3 * (flops[1] - head)


@pytest.mark.slow
@pytest.mark.parametrize('form,active', [('split', (1,)), ('project', (0, 2)), ('split', ())])
def test_kv_cache_with_branch_subsets(form, active):
  m = model_config(pgpt=dict(branch_input=form, active_branches=active))
  model, variables = init(m)
  prompt = jax.random.randint(jax.random.key(4), (2, 5), 0, V)
  kw = dict(max_new_tokens=10, temperature=0.0, top_k=0, top_p=1.0)
  cached = sample.generate_cached(model, variables, prompt, jax.random.key(0), **kw)
  uncached = sample.generate_uncached(model, variables, prompt, jax.random.key(0), **kw)
  np.testing.assert_array_equal(np.asarray(cached), np.asarray(uncached))
  cache = jax.eval_shape(lambda: model.init(jax.random.key(0), prompt[:, :1], decode=True))['cache']
  k = len(active) or 3
  assert {x.shape[0] for x in jax.tree.leaves(cache['branches'])} == {k}  # only the running branches' cache


@pytest.mark.parametrize(
  'overrides,pattern',
  [
    ({'pgpt': {'num_branches': 1}}, r'model.pgpt.num_branches=1 is invalid'),
    ({'pgpt': {'num_branches': 2}}, r'model.pgpt.num_branches=2 does not divide model.num_layers=3'),
    (
      {'pgpt': {'active_branches': (3,)}},
      r'model.pgpt.active_branches=\(3,\) is invalid; give distinct branch indices in 0..2',
    ),
    ({'pgpt': {'active_branches': (1, 1)}}, r'model.pgpt.active_branches=\(1, 1\) is invalid'),
    ({'tie_embeddings': True}, r'model.tie_embeddings=True does not fit branch_input=split'),
    (
      {'pgpt': {'branch_input': 'concat'}},
      r"model.pgpt.branch_input='concat' is invalid; valid values: split, project",
    ),
    ({'pgpt': {'branch_mix': 'sum'}}, r"model.pgpt.branch_mix='sum' is invalid; valid values: softmax, scalar"),
    (
      {'pgpt': {'branch_mix': 'scalar'}},
      r"model.pgpt.branch_mix='scalar' mixes two branches \(w, 1 - w\); model.pgpt.num_branches=3",
    ),
  ],
)
def test_bad_settings_are_one_line_errors(overrides, pattern):
  with pytest.raises(EffjaxError, match=pattern):
    build_model(model_config(**overrides))


# ---------------------------------------------------------------------------------------------------------
# the training loop


@pytest.mark.slow
def test_a_checkpoint_evaluates_with_any_branch_subset(tmp_path, corpus_dir):
  """active_branches is a runtime key: a checkpoint trained with every branch restores with any subset, and each
  subset gives its own loss. (Resume and meshes: tests/test_contract.py.)"""
  overrides = {'train.steps': 4, 'checkpoint.every': 4}
  train.train_and_evaluate(
    run_config(corpus_dir, **overrides, **{'mesh.data': 1}),
    str(tmp_path / 'straight'),
    devices=one_device(),
    progress=False,
  )
  config = run_config(corpus_dir, **overrides, **{'model.pgpt.active_branches': (1,)})
  _, state, config, _, _ = modes.restore_trained(config, str(tmp_path / 'straight'))
  bundle, _ = train.load_data(config, str(tmp_path / 'straight'))
  batch = next(iter(pipeline.eval_batches(bundle.val_tokens, seq_len=32, batch_size=8, max_batches=1)))
  variables = jax.device_get(state.variables())
  losses = {}
  for active in ((), (0,), (1,)):
    model = build_model(variant(config.model, pgpt=dict(active_branches=active)))
    losses[active] = float(train.cross_entropy(jax.jit(model.apply)(variables, batch['inputs']), batch['targets']))
  assert len({round(v, 6) for v in losses.values()}) == 3, losses


@pytest.mark.slow
def test_cli_train_then_sample_one_branch(tmp_path, corpus_dir):
  workdir = str(tmp_path / 'run')
  common = ['--config=configs/pgpt.py:tiny', f'--workdir={workdir}', f'--config.data.corpus={corpus_dir}']
  result = run_cli(*common, '--config.train.steps=6', '--progress=false')
  assert result.returncode == 0, result.stderr[-2000:]
  summary = json.load(open(os.path.join(workdir, 'summary.json')))
  assert summary['family'] == 'pgpt' and summary['active_params'] == summary['total_params']
  result = run_cli(
    *common,
    '--mode=sample',
    '--config.model.pgpt.active_branches=(1,)',
    '--prompt=def ',
    '--max_new_tokens=12',
    '--temperature=0',
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.startswith('def ')
