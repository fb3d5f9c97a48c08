"""GPT-Efficio: cross-layer sharing (nn.scan with broadcast params; all layers or G groups) and factorized
embeddings (V×E table, E×H projection, tied logits h·Pᵀ·Wᵀ), alone and with sharding and export (causality, the KV
cache, resume and meshes: tests/test_contract.py)."""

import os
import time
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from effjax.configs import efficio
from effjax import accounting, checkpoint, modes, sample, state as state_lib, train
from effjax.errors import EffjaxError
from effjax.models import build_model, layers
from tests.helpers import close, run_cli, variant_config

V = 50


def model_config(**overrides):
  m = efficio.get_config('tiny').model
  m.vocab_size = V
  m.update(overrides)
  return m


def init(m, seed=0, length=16):
  model = build_model(m)
  return model, nn.unbox(model.init(jax.random.key(seed), jnp.zeros((2, length), jnp.int32)))


def variant(m, **overrides):
  out = ml_collections.ConfigDict(m.to_dict())
  out.update(overrides)
  return out


def run_config(corpus, **overrides):
  return variant_config(efficio, corpus, **overrides)


# ---------------------------------------------------------------------------------------------------------
# configs and accounting


def test_presets_build_and_unknown_preset_is_an_error():
  for preset in ('', 'tiny', *efficio.ABLATIONS):
    c = efficio.get_config(preset)
    c.model.vocab_size = 100
    build_model(c.model)
  assert efficio.get_config('baseline').model.share_layers == 'none'
  assert efficio.get_config('baseline').model.embed_dim == 0
  assert efficio.get_config('groups4').model.num_groups == 4
  with pytest.raises(EffjaxError, match="unknown preset 'nope' for configs/efficio.py"):
    efficio.get_config('nope')


def test_paper_preset_summary_is_about_950m_and_fast():
  c = efficio.get_config('paper')
  t0 = time.time()
  s = accounting.summarize(c)
  assert time.time() - t0 < 60
  m = c.model
  assert 0.9e9 <= s['total_params'] <= 1.0e9, s['total_params']
  assert s['embedding_params'] == m.vocab_size * m.embed_dim + m.embed_dim * m.d_model  # rotary: no pos table
  assert s['unique_blocks'] == 1 and s['layer_applications'] == m.num_layers
  assert s['unshared_equivalent_params'] == s['total_params'] + (m.num_layers - 1) * s['params_per_block']


def test_shared_params_independent_of_depth_while_flops_grow_linearly():
  totals, flops = {}, {}
  for depth in (2, 4, 8):
    m = model_config(num_layers=depth, share_layers='all')
    totals[depth] = accounting.param_counts(m)['total_params']
    flops[depth] = accounting.flops_per_token(m, 32)
    # a shared block costs exactly what an independent one does per application
    assert flops[depth] == accounting.flops_per_token(variant(m, share_layers='none'), 32)
  assert totals[2] == totals[4] == totals[8]
  per_layer = (flops[4] - flops[2]) // 2
  assert per_layer > 0 and flops[8] - flops[4] == 4 * per_layer and flops[2] - 2 * per_layer > 0
  unshared = [accounting.param_counts(model_config(num_layers=d, share_layers='none'))['total_params'] for d in (2, 4)]
  assert unshared[1] - unshared[0] == 2 * (unshared[0] - totals[2])  # (L-1) extra blocks when unshared
  groups = accounting.param_counts(model_config(num_layers=8, share_layers='groups', num_groups=4))
  assert groups['total_params'] == unshared[1]  # G=4 unique blocks over 8 layers = 4 independent blocks


@pytest.mark.parametrize('pos_emb,tie', [('learned', True), ('rotary', True), ('rotary', False), ('learned', False)])
def test_factorized_embedding_params_exact(pos_emb, tie):
  """embedding params = V·E + E·H (+ max_len·H for a learned position table, + H·V for an untied head)."""
  m = model_config(pos_emb=pos_emb, tie_embeddings=tie, embed_dim=16)
  e, h, n_pos = m.embed_dim, m.d_model, m.max_len if pos_emb == 'learned' else 0
  counts = accounting.param_counts(m)
  assert counts['embedding_params'] == V * e + e * h + n_pos * h + (0 if tie else h * V)
  dense = accounting.param_counts(variant(m, embed_dim=0))
  assert dense['embedding_params'] == V * h + n_pos * h + (0 if tie else h * V)
  assert dense['non_embedding_trainable_params'] == counts['non_embedding_trainable_params']
  s = accounting.summarize(ml_collections.ConfigDict({**efficio.get_config('tiny').to_dict(), 'model': m.to_dict()}))
  assert (s['embed_table_params'], s['embed_projection_params'], s['pos_embedding_params']) == (V * e, e * h, n_pos * h)


# ---------------------------------------------------------------------------------------------------------
# numerics of the shared stack


def test_shared_stack_equals_one_block_applied_l_times_by_hand():
  cfg = ml_collections.FrozenConfigDict(model_config())
  kwargs = dict(cfg=cfg, d_model=cfg.d_model, num_heads=cfg.num_heads, num_layers=5)
  stack = layers.LayerStack(layers.Block, kwargs, num_layers=5, scan=True, share='all')
  x = jax.random.normal(jax.random.key(1), (2, 8, cfg.d_model))
  pos = jnp.arange(8)
  params = nn.unbox(stack.init(jax.random.key(0), x, pos))['params']
  assert set(params) == {'shared'}
  block = layers.Block(**kwargs)
  y = x
  for _ in range(5):
    y = block.apply({'params': params['shared']}, y, pos)
  close(stack.apply({'params': params}, x, pos), y)
  assert float(jnp.abs(y - block.apply({'params': params['shared']}, x, pos)).max()) > 1e-3  # L matters


def _replicated_reference(m, params):
  """The same network as L independent unrolled blocks, layer i holding the weights of its shared block."""
  unshared = variant(m, share_layers='none', scan_layers=False)
  repeats = m.num_layers // (1 if m.share_layers == 'all' else m.num_groups)
  blocks = layers.unstack_layers(params)['stack']
  source = lambda i: blocks['shared'] if m.share_layers == 'all' else blocks[f'group_{i // repeats}']
  ref = {**params, 'stack': {f'layer_{i}': source(i) for i in range(m.num_layers)}}
  return build_model(unshared), ref, repeats


@pytest.mark.slow
@pytest.mark.parametrize('share', ['all', 'groups'])
def test_shared_grads_are_sum_over_applications(share):
  m = model_config(num_layers=4, share_layers=share, num_groups=2, embed_dim=16)
  model, variables = init(m)
  ref_model, ref_params, repeats = _replicated_reference(m, variables['params'])
  tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, V)
  loss = lambda mod: lambda p: jnp.mean(mod.apply({'params': p}, tokens) ** 2)
  close(model.apply(variables, tokens), ref_model.apply({'params': ref_params}, tokens))
  g_shared = jax.grad(loss(model))(variables['params'])
  g_ref = jax.grad(loss(ref_model))(ref_params)
  per_layer = [g_ref['stack'][f'layer_{i}'] for i in range(m.num_layers)]
  if share == 'all':
    expected = jax.tree.map(lambda *gs: sum(gs), *per_layer)
    got = g_shared['stack']['shared']
  else:
    expected = jax.tree.map(
      lambda *gs: jnp.stack([sum(gs[g * repeats : (g + 1) * repeats]) for g in range(m.num_groups)]), *per_layer
    )
    got = g_shared['stack']['groups']['shared']
  jax.tree.map(lambda a, b: close(a, b, atol=1e-6), got, expected)
  jax.tree.map(lambda a, b: close(a, b, atol=1e-6), g_shared['embed'], g_ref['embed'])
  # and each application contributes: the sum is not just the last layer's gradient
  last = g_ref['stack'][f'layer_{m.num_layers - 1}']['mlp']['fc']['kernel']
  assert (
    float(jnp.abs(last - (got['mlp']['fc']['kernel'] if share == 'all' else got['mlp']['fc']['kernel'][-1])).max())
    > 1e-7
  )


@pytest.mark.slow
@pytest.mark.parametrize(
  'share,groups,remat', [('none', 1, 'none'), ('all', 1, 'none'), ('groups', 2, 'none'), ('groups', 2, 'full')]
)
def test_scanned_equals_unscanned(share, groups, remat):
  m = model_config(num_layers=4, share_layers=share, num_groups=groups, remat=remat)
  model, variables = init(m)
  unrolled = build_model(variant(m, scan_layers=False))
  tokens = jax.random.randint(jax.random.key(3), (2, 16), 0, V)
  params_u = layers.unstack_layers(variables['params'])
  expected = nn.unbox(jax.eval_shape(lambda: unrolled.init(jax.random.key(0), tokens)))['params']
  assert jax.tree.structure(expected) == jax.tree.structure(params_u)
  assert jax.tree.map(lambda x: x.shape, expected) == jax.tree.map(lambda x: x.shape, params_u)
  close(model.apply(variables, tokens), unrolled.apply({'params': params_u}, tokens))
  jax.tree.map(np.testing.assert_array_equal, layers.stack_layers(params_u), variables['params'])


def test_groups_apply_each_block_l_over_g_consecutive_times():
  """groups=2 over 4 layers is the unshared model with layers (0,1) = block 0 and (2,3) = block 1."""
  m = model_config(num_layers=4, share_layers='groups', num_groups=2, pos_emb='rotary')
  model, variables = init(m)
  ref_model, ref_params, _ = _replicated_reference(m, variables['params'])
  tokens = jax.random.randint(jax.random.key(4), (2, 16), 0, V)
  close(model.apply(variables, tokens), ref_model.apply({'params': ref_params}, tokens))
  swapped = dict(
    ref_params, stack={f'layer_{i}': ref_params['stack'][f'layer_{j}'] for i, j in enumerate((0, 2, 1, 3))}
  )
  assert float(jnp.abs(model.apply(variables, tokens) - ref_model.apply({'params': swapped}, tokens)).max()) > 1e-4


# ---------------------------------------------------------------------------------------------------------
# the training stack: sharding, resume, export


@pytest.mark.slow
def test_groups_and_factorization_shard_on_8_devices_and_export(tmp_path, corpus_dir):
  """The grouped stack and the factorized tables shard on data x fsdp x tensor; the trained run exports and the
  export gives the run's logits. (Resume and 1 device == 8 devices: tests/test_contract.py.)"""
  mesh = {'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.tensor': 2}
  overrides = {
    'train.steps': 4,
    'train.log_every': 1,
    'checkpoint.every': 4,
    'model.share_layers': 'groups',
    'model.num_groups': 2,
    'model.embed_dim': 16,
    'model.dropout': 0.1,
  }
  setup = state_lib.make_setup(run_config(corpus_dir, **overrides, **mesh, **{'model.vocab_size': 64}))
  shardings = setup.state_shardings.params
  sharded = lambda spec: any(axis is not None for axis in spec)
  group_kernel = shardings['stack']['groups']['shared']['mlp']['fc']['kernel'].spec
  assert group_kernel[0] is None and sharded(group_kernel)  # the G axis ('layers') stays whole, the block shards
  assert all(sharded(shardings['embed'][k].spec) for k in ('embedding', 'projection')), shardings['embed']

  train.train_and_evaluate(run_config(corpus_dir, **overrides, **mesh), str(tmp_path / 'straight'))
  # export -> load_export -> the same logits and a cached sample
  config = run_config(corpus_dir, **overrides, **mesh)
  flags = types.SimpleNamespace(
    workdir=str(tmp_path / 'straight'), export_dir=str(tmp_path / 'export'), export_dtype='float32'
  )
  modes.run_export(config, flags)
  model, variables, exported = checkpoint.load_export(str(tmp_path / 'export'))
  assert exported.model.share_layers == 'groups' and exported.model.embed_dim == 16
  setup, state, _, tokenizer, _ = modes.restore_trained(config, str(tmp_path / 'straight'))
  tokens = jnp.asarray([tokenizer.encode('def f(x):')], jnp.int32)
  close(model.apply(variables, tokens), setup.model.apply(jax.device_get(state.variables()), tokens))
  text = sample.sample_text(
    model, variables, tokenizer, 'def ', max_new_tokens=8, temperature=0.0, top_k=0, top_p=1.0, seed=0
  )
  assert len(text) == 1 and len(text[0]) > 0


# ---------------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
  'overrides,pattern',
  [
    ({'share_layers': 'groups', 'num_groups': 3}, r'model.num_groups=3 does not divide model.num_layers=4'),
    ({'share_layers': 'groups', 'num_groups': 0}, r'model.num_groups=0 is invalid'),
    ({'embed_dim': 65}, r'model.embed_dim=65 is invalid; use 0 \(no factorization\) or 1..d_model=64'),
    ({'embed_dim': -4}, r'model.embed_dim=-4 is invalid'),
    ({'share_layers': 'some'}, r"model.share_layers='some' is invalid; valid values: none, all, groups"),
  ],
)
def test_bad_sharing_and_factorization_settings(overrides, pattern):
  with pytest.raises(EffjaxError, match=pattern):
    build_model(model_config(**overrides))


@pytest.mark.slow
def test_cli_refuses_checkpoint_with_other_sharing_mode_and_changes_nothing(tmp_path, corpus_dir):
  workdir = tmp_path / 'run'
  common = [
    '--config=configs/efficio.py:tiny',
    f'--workdir={workdir}',
    f'--config.data.corpus={corpus_dir}',
    '--config.train.steps=4',
    '--config.checkpoint.every=2',
    '--progress=false',
  ]
  result = run_cli(*common)
  assert result.returncode == 0, result.stderr[-2000:]
  before = {
    p: (p.stat().st_mtime_ns, p.stat().st_size) for p in workdir.rglob('*') if p.is_file() and p.name != '.lock'
  }
  result = run_cli(*common, '--config.model.share_layers=none')
  assert result.returncode == 2
  lines = [line for line in result.stderr.splitlines() if line.startswith('effjax: error:')]
  assert len(lines) == 1 and "share_layers: checkpoint 'all' vs config 'none'" in lines[0], result.stderr[-2000:]
  assert 'Traceback' not in result.stderr
  after = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in workdir.rglob('*') if p.is_file() and p.name != '.lock'}
  assert after == before
  assert os.path.exists(workdir / 'checkpoints' / '4')


def test_ablation_grid_equal_flops_and_best_lr():
  """experiments/efficio_ablation: the equal-FLOPs variant does at least the baseline's forward FLOPs per token (and
  within 3 %), the d_model-96 shared + factorized model fewer; --runs aliases; --lrs=best takes each variant's
  lowest seed-0 loss; lr and seed reach the config."""
  from experiments import efficio_ablation as ea  # pylint: disable=import-outside-toplevel

  def flops(label, **kw):
    preset, overrides = {**ea.RUNS, **ea.EQUAL_FLOPS}[label]
    c = ea.make_config(preset, overrides, 10, **kw)
    c.model.vocab_size = ea.SCALE['data']['bpe_vocab_size']
    return accounting.flops_per_token(c.model, c.data.seq_len)

  base = flops('neither (baseline)')
  assert flops('share all + E=64 (efficio)') < base <= flops(*ea.EQUAL_FLOPS) <= 1.03 * base
  c = ea.make_config('', {}, 10, lr=4e-3, seed=2)
  assert (c.train.lr, c.seed) == (4e-3, 2)
  assert list(ea.select('efficio,baseline,equal', False)) == [
    'share all + E=64 (efficio)',
    'neither (baseline)',
    *ea.EQUAL_FLOPS,
  ]
  assert list(ea.select('core', False)) == list(ea.CORE)
  rows = [
    dict(label='a', lr=1e-3, seed=0, final_val_loss=5.0),
    dict(label='a', lr=2e-3, seed=0, final_val_loss=4.9),
    dict(label='a', lr=1e-3, seed=1, final_val_loss=4.0),  # other seeds do not choose
  ]
  assert ea.best_lrs(rows) == {'a': 2e-3}
