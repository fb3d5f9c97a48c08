"""Sharding of every family and technique on the 8 CPU devices, the named rule sets, memory planning and the
cuDNN-attention guard.

Each family case is (config file, preset, overrides). The same tiny run on (data=2, fsdp=4) and on
(data=2, fsdp=2, tensor=2) gives the same losses (tol 1e-5), and the trained state restored from the run's
checkpoint really is sharded: named params and their Adam moments have the expected specs and per-device shard
shapes, and a device holds about 1/fsdp of the parameter bytes.
"""

from __future__ import annotations

import math
import os

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from effjax.configs import base
from effjax import checkpoint, memory, metrics, sharding, state as state_lib, train
from effjax.errors import EffjaxError
from effjax.models import build_model
from tests.helpers import run_cli, set_dotted

# (config file, preset, overrides). Families and techniques: plain GPT; GPT-Efficio (one shared block applied at
# every layer + factorized embedding; grouped sharing); structured MLPs (FastFood, block-diagonal); p-gpt branches
# (split and project inputs); lc-gpt / cc-gpt (widths shrink with depth); doping (frozen MLPs in the 'frozen'
# collection). Techniques compose, so the training runs (3 compiles each: the slow part) pair some of them.
RUN_CASES = [
  ('gpt', 'tiny', {}),
  ('efficio', 'tiny', {}),
  ('efficio', 'tiny', {'model.share_layers': 'groups', 'model.num_groups': 2, 'model.mlp_kind': 'fastfood'}),
  ('doped', 'tiny', {'model.mlp_kind': 'blockdiag'}),
  ('pgpt', 'tiny', {}),
  ('lcgpt', 'tiny', {}),
  ('ccgpt', 'tiny', {'model.compress.conv_kernel': 3}),
]
CASES = RUN_CASES + [
  ('fastfood', 'tiny', {}),
  ('blockdiag', 'tiny', {}),
  ('pgpt', 'tiny', {'model.pgpt.branch_input': 'project'}),
  ('pgpt', 'tiny', {'model.pgpt.branch_impl': 'loop'}),
  ('doped', 'tiny', {'model.scan_layers': False}),
  ('gpt', 'tiny', {'model.scan_layers': False}),
]


def case_id(case) -> str:
  variant, preset, overrides = case
  return f'{variant}:{preset}' + ''.join(f',{k.split(".")[-1]}={v}' for k, v in overrides.items())


MESHES = {'fsdp4': (2, 4, 1), 'tp2': (2, 2, 2)}
VOCAB = 48  # fixed for abstract-only tests (no corpus needed); divisible by 8, so vocab dims shard too


def load_config(variant: str, preset: str, overrides: dict, corpus: str | None = None):
  module = __import__(f'effjax.configs.{variant}', fromlist=['get_config'])
  c = set_dotted(module.get_config(preset), overrides)
  if corpus is not None:
    c.data.update(corpus=corpus, tokenizer='char')
  else:
    c.model.vocab_size = VOCAB
  return c


def short_run(c, mesh=(1, 1, 1)):
  """3 logged steps, then a checkpoint; stop_at < steps skips the final evaluation (one compile less)."""
  c.train.update(steps=4, stop_at=3, log_every=1, eval_every=100, eval_batches=1, grad_accum=1)
  c.checkpoint.every = 3
  c.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
  return c


def losses(workdir) -> list[float]:
  by_step = {m['step']: m['loss'] for m in metrics.read_metrics(str(workdir)) if m['split'] == 'train'}
  return [by_step[s] for s in sorted(by_step)]


def leaves_with_paths(tree) -> dict[str, jax.Array]:
  return {
    '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path): leaf
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def expected_spec(shape, names, mesh_sizes) -> P:
  """What a (.., embed, heads|mlp) kernel must get under the default rules: embed over fsdp, heads/mlp over
  tensor (where they divide), leading stacked axes (layers, branch) replicated."""
  want = {'embed': 'fsdp', 'heads': 'tensor', 'mlp': 'tensor'}
  out = []
  for dim, name in zip(shape, (None,) * (len(shape) - len(names)) + tuple(names)):
    axis = want.get(name)
    out.append(axis if axis and mesh_sizes[axis] > 1 and dim % mesh_sizes[axis] == 0 else None)
  return P(*out)


# Named params every family has (trailing path -> logical names of the trailing dims).
NAMED = {
  'attn/query/kernel': ('embed', 'heads'),
  'attn/out/kernel': ('heads', 'embed'),
  'mlp/fc/kernel': ('embed', 'mlp'),  # dense and block-diagonal MLPs (not FastFood: diagonals only)
  'mlp/proj/kernel': ('mlp', 'embed'),
}


def adam_moments(opt_state):
  found = [
    s
    for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
    if isinstance(s, optax.ScaleByAdamState)
  ]
  assert len(found) == 1
  return found[0].mu, found[0].nu


@pytest.mark.slow
@pytest.mark.parametrize('variant,preset,overrides', RUN_CASES, ids=map(case_id, RUN_CASES))
def test_family_sharded_runs_agree_and_shard(tmp_path, corpus_dir, variant, preset, overrides):
  """(data=2, fsdp=4) == (data=2, fsdp=2, tensor=2) losses (tol 1e-5; 1 device == 8 devices for every variant's
  own preset: tests/test_contract.py), and the trained state is sharded: specs and shard shapes of named params
  and of their Adam moments, ~1/fsdp of the bytes per device."""
  reference = None
  for label, mesh in MESHES.items():
    workdir = tmp_path / label
    if reference is not None:
      os.makedirs(workdir)
      os.symlink(tmp_path / 'fsdp4' / 'data', workdir / 'data')  # same token cache: no re-tokenizing
    c = short_run(load_config(variant, preset, overrides, corpus_dir), mesh)
    train.train_and_evaluate(c, str(workdir), progress=False)
    if reference is None:
      reference = losses(workdir)
      assert len(reference) == 3 and all(np.isfinite(reference))
    np.testing.assert_allclose(losses(workdir), reference, atol=1e-5, err_msg=label)

    c = train.resolve_vocab(c, checkpoint_tokenizer(workdir))
    setup = state_lib.make_setup(c)
    ckpt = checkpoint.Checkpointer(str(workdir / 'checkpoints'), 1)
    state, _ = ckpt.restore(3, setup.abstract_state)
    ckpt.close()
    sizes = dict(setup.mesh.shape)
    params = leaves_with_paths(state.params)
    mu, nu = (leaves_with_paths(m) for m in adam_moments(state.opt_state))
    checked = 0
    for path, leaf in params.items():
      suffix = next((s for s in NAMED if path.endswith(s)), None)
      if suffix is None:
        continue
      spec = expected_spec(leaf.shape, NAMED[suffix], sizes)
      shard = sharding.shard_shape(leaf.shape, spec, setup.mesh)
      assert leaf.sharding.spec == spec, (label, path, leaf.sharding.spec, spec)
      assert all(s.data.shape == shard for s in leaf.addressable_shards), (label, path)
      for moment in (mu[path], nu[path]):
        assert moment.sharding.spec == spec and moment.addressable_shards[0].data.shape == shard, (label, path)
      checked += 1
    assert checked >= 2, f'{label}: no named attention/MLP kernels found in {sorted(params)}'
    # ZeRO-3: a device holds 1/fsdp of the params and of the Adam moments, apart from the FastFood diagonals
    # (replicated by design: each block's FWHT needs all of n) and dims nothing divides; less with tensor=2.
    total = sum(x.nbytes for x in params.values())
    diagonals = sum(x.nbytes for p, x in params.items() if p.rsplit('/', 1)[-1] in ('b', 'g', 's'))
    for tree in (params, mu):
      on_device0 = sum(x.addressable_shards[0].data.nbytes for x in tree.values())
      assert on_device0 <= (total - diagonals) / sizes['fsdp'] * 1.05 + diagonals, (label, on_device0, total)
    if sizes['tensor'] > 1:
      assert sum(x.addressable_shards[0].data.nbytes for x in params.values()) < total / sizes['fsdp']


def checkpoint_tokenizer(workdir):
  from effjax.data import tokenizers  # pylint: disable=import-outside-toplevel

  return tokenizers.load_tokenizer(str(workdir / 'data'))


def boxed_variables(config):
  model = build_model(config.model)
  return jax.eval_shape(lambda r: state_lib.init_variables(model, r, config.data.seq_len), jax.random.key(0))


@pytest.mark.parametrize('variant,preset,overrides', CASES, ids=map(case_id, CASES))
def test_every_param_has_logical_axis_names(variant, preset, overrides):
  """Walks nn.get_partition_spec of the boxed init: every params/frozen leaf is LogicallyPartitioned, with one
  name (or None) per dimension, and every name has a rule (a typo would silently replicate)."""
  c = load_config(variant, preset, overrides)
  boxed = boxed_variables(c)
  rule_names = {name for name, _ in base.DEFAULT_RULES}
  specs = nn.get_partition_spec(boxed)
  unannotated, bad_rank, unknown = [], [], []
  for collection in ('params', 'frozen'):
    tree = boxed.get(collection, {})
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
    for path, leaf in flat:
      name = f'{collection}/{jax.tree_util.keystr(path)}'
      if not isinstance(leaf, nn.LogicallyPartitioned):
        unannotated.append(name)
        continue
      if len(leaf.names) != leaf.value.ndim:
        bad_rank.append((name, leaf.names, leaf.value.shape))
      unknown += [(name, n) for n in leaf.names if n is not None and n not in rule_names]
  assert not unannotated, f'params without logical axis names: {unannotated}'
  assert not bad_rank, f'logical names do not match the rank: {bad_rank}'
  assert not unknown, f'logical names with no rule in configs/base.py: {unknown}'
  # and the partition specs flax derives from them are per-dimension
  for spec, value in zip(
    jax.tree.leaves(specs['params'], is_leaf=lambda x: isinstance(x, P)), jax.tree.leaves(nn.unbox(boxed['params']))
  ):
    assert len(spec) == value.ndim
  if 'frozen' in boxed:
    assert jax.tree.leaves(boxed['frozen']), 'doping must put its frozen weights in the frozen collection'


def test_rule_sets_layouts():
  """The named rule sets on (data=2, fsdp=4): dp replicates every param and splits the batch over all 8 devices;
  fsdp shards every param of gpt:tiny over fsdp; fsdp_tp (default) adds tensor on heads/mlp."""
  c = load_config('gpt', 'tiny', {})
  c.mesh.update(data=2, fsdp=2, tensor=2)
  for name, rules in base.RULE_SETS.items():
    c.mesh.rules = rules
    setup = state_lib.make_setup(c)
    specs = leaves_with_paths(
      jax.tree.map(lambda s: s.spec, setup.state_shardings.params, is_leaf=lambda x: hasattr(x, 'spec'))
    )
    used = [
      {a for entry in spec if entry for a in ((entry,) if isinstance(entry, str) else entry)} for spec in specs.values()
    ]
    if name == 'dp':
      assert all(not u for u in used)
      assert setup.batch_sharding.spec == P(('data', 'fsdp', 'tensor'), None)
    elif name == 'fsdp':
      assert all(u == {'fsdp'} for u in used), specs
    else:
      assert all('fsdp' in u for u in used), specs
      assert specs['stack/layers/mlp/fc/kernel'] == P(None, 'fsdp', 'tensor')
      assert specs['stack/layers/mlp/fc/bias'] == P(None, ('tensor', 'fsdp'))
      assert specs['stack/layers/attn/out/kernel'] == P(None, 'tensor', 'fsdp')


def test_fit_drops_axes_that_do_not_divide():
  mesh = jax.sharding.AbstractMesh((2, 2, 2), sharding.AXES)
  assert sharding._fit(P(('tensor', 'fsdp')), (97,), mesh) == P(None)  # pylint: disable=protected-access
  assert sharding._fit(P(('tensor', 'fsdp')), (6,), mesh) == P('tensor')  # pylint: disable=protected-access
  assert sharding._fit(P('data', ('tensor', 'fsdp')), (4, 8), mesh) == P('data', ('tensor', 'fsdp'))  # pylint: disable=protected-access


# ------------------------------------------------------------------------------------------------- memory


def plan_for(mesh, remat='none', devices=None, **model):
  c = load_config('gpt', 'tiny', {'model.remat': remat, **{f'model.{k}': v for k, v in model.items()}})
  c.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
  return memory.plan(c, devices or math.prod(mesh))


def test_memory_fsdp_over_4_divides_param_grad_optimizer_bytes_by_4():
  one, four = plan_for((1, 1, 1)), plan_for((1, 4, 1))
  assert four['param_bytes'] * 4 == one['param_bytes'] == one['total_param_bytes']
  assert four['grad_bytes'] * 4 == one['grad_bytes']
  scalars = one['optimizer_bytes'] - 2 * one['param_bytes']  # Adam μ, ν + replicated step counts
  assert 0 <= scalars <= 16
  assert four['optimizer_bytes'] == (one['optimizer_bytes'] - scalars) // 4 + scalars
  assert four['activation_bytes'] * 4 == pytest.approx(one['activation_bytes'])  # the batch is split over fsdp too
  # data parallelism replicates params: only the activations shrink
  dp = plan_for((4, 1, 1))
  assert dp['param_bytes'] == one['param_bytes']
  assert dp['activation_bytes'] * 4 == pytest.approx(one['activation_bytes'])


def test_memory_plan_matches_real_shards():
  """The abstract plan counts exactly the bytes the real sharded state puts on a device."""
  c = load_config('gpt', 'tiny', {})
  c.mesh.update(data=2, fsdp=2, tensor=2)
  plan = memory.plan(c, 8)
  setup = state_lib.make_setup(c)
  real = sharding_bytes(setup.abstract_state.params, setup.mesh)
  assert plan['param_bytes'] == real
  assert plan['optimizer_bytes'] == sharding_bytes(setup.abstract_state.opt_state, setup.mesh)


def sharding_bytes(abstract, mesh) -> int:
  return sum(
    math.prod(sharding.shard_shape(x.shape, x.sharding.spec, mesh)) * x.dtype.itemsize
    for x in jax.tree.leaves(abstract)
  )


def test_memory_remat_lowers_activation_bytes():
  none, dots, full = (plan_for((1, 1, 1), remat) for remat in ('none', 'dots_saveable', 'full'))
  assert none['activation_bytes'] > dots['activation_bytes'] > full['activation_bytes']
  assert none['param_bytes'] == full['param_bytes']
  bf16 = plan_for((1, 1, 1), dtype='bfloat16')
  assert bf16['activation_bytes'] < none['activation_bytes']


def test_memory_accelerators():
  assert memory.parse_accelerator('v4-8') == (4, 32.0, 'tpu')
  assert memory.parse_accelerator('v5litepod-16') == (16, 16.0, 'tpu')
  assert memory.parse_accelerator('h100') == (1, 80.0, 'gpu')
  assert memory.parse_accelerator('8xh100') == (8, 80.0, 'gpu')
  with pytest.raises(EffjaxError, match='unknown'):
    memory.parse_accelerator('v9-bogus')


@pytest.mark.slow
def test_memory_mode_cli_medium_on_v4_8():
  """`--mode=memory` answers 'does Medium fit on a v4-8?' without any TPU (and without data)."""
  result = run_cli(
    '--mode=memory', '--config=configs/gpt.py:medium', '--accelerator=v4-8', '--config.model.remat=full', timeout=120
  )
  assert result.returncode == 0, result.stderr[-2000:]
  out = result.stdout
  assert 'per-device memory on 4 device(s) (v4-8), mesh data=4 x fsdp=1 x tensor=1' in out
  assert 'usable HBM' in out and ('fits' in out or 'does NOT fit' in out)
  bad = run_cli('--mode=memory', '--config=configs/gpt.py:medium', '--accelerator=v99-1', timeout=120)
  assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith('effjax: error: --accelerator')


# ------------------------------------------------------------------------------------------------- GPU guard


def test_cudnn_attention_refused_clearly_on_cpu():
  c = load_config('gpt', 'tiny', {'model.attention_impl': 'cudnn', 'model.dtype': 'bfloat16'})
  if jax.default_backend() == 'gpu':
    pytest.skip('a GPU is present')
  with pytest.raises(EffjaxError, match=r"attention_impl='cudnn' needs an NVIDIA GPU"):
    train.check_train_config(c)
