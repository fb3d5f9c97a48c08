"""Claims about effjax.models.structured: exact transforms, explicit matrices, param counts, init scale."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from effjax.models import structured as st


def _randn(seed, *shape):
  """Test inputs from numpy: jax.random would compile a sampler for every new shape."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _init(module, d_in, seed=0, batch=(3,)):
  x = _randn(seed + 1, *batch, d_in)
  return nn.unbox(jax.jit(module.init)(jax.random.key(seed), x)), x  # one compile beats eager samplers


SIZES = [2**k for k in range(14)]


@functools.lru_cache
def _hadamard(n):
  return scipy.linalg.hadamard(n, dtype=np.int8)


def _n_params(variables):
  return sum(p.size for p in jax.tree.leaves(variables['params']))


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_fwht_matches_scipy(dtype):
  """n = 1, 2, 4, ..., 8192 (one jit for all sizes: compiling 14 programs would dominate the test time)."""
  xs = {n: _randn(n, 4 if n <= 1024 else 2, n).astype(dtype) for n in SIZES}
  outs = jax.jit(lambda xs: {n: st.fwht(x) for n, x in xs.items()})(xs)
  for n, x in xs.items():
    cols = np.arange(n) if n <= 1024 else np.random.default_rng(0).choice(n, 256, replace=False)
    want = np.asarray(x, np.float32) @ _hadamard(n)[:, cols]  # big n: 256 random columns of H
    assert outs[n].dtype == dtype and outs[n].shape == x.shape
    err = np.linalg.norm(np.asarray(outs[n], np.float32)[:, cols] - want) / np.linalg.norm(want)
    assert err < (1e-5 if dtype == jnp.float32 else 1e-2), (n, err)


def test_fwht_jit_batched_leading_axes():
  x = _randn(0, 2, 3, 64)
  np.testing.assert_allclose(jax.jit(st.fwht)(x), x @ scipy.linalg.hadamard(64), rtol=1e-5, atol=1e-4)


def test_fwht_grad_is_transform():
  n = 256
  x = _randn(0, 3, n)
  g = _randn(1, 3, n)
  h = scipy.linalg.hadamard(n).astype(np.float32)
  _, vjp = jax.vjp(st.fwht, x)
  np.testing.assert_allclose(vjp(g)[0], g @ h.T, rtol=1e-5, atol=1e-3)
  grad = jax.grad(lambda x: jnp.sum(st.fwht(x) * g))(x)
  np.testing.assert_allclose(grad, g @ h, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize('n', [0, 3, 6, 100])
def test_fwht_rejects_non_power_of_two(n):
  with pytest.raises(ValueError, match=f'n={n}'):
    st.fwht(jnp.ones((2, n)))


@pytest.mark.parametrize('d_in,d_out', [(48, 200), (64, 64)])
def test_fastfood_equals_its_dense_matrix(d_in, d_out):
  """The layer is x @ W + bias with W = [S H G Π H B per block], stacked, truncated, / sqrt(n·in).

  48 -> 200 pads to n = 64 and stacks 4 blocks (truncating 256 -> 200 outputs)."""
  layer = st.AdaptiveFastFood(d_out)
  variables, x = _init(layer, d_in)
  variables['params']['bias'] = _randn(5, d_out)
  # One compiled apply on [I; 0; x] (what dense_matrix does) gives W and the layer's output on x.
  y = jax.jit(layer.apply)(variables, jnp.concatenate([jnp.eye(d_in), jnp.zeros((d_in, d_in)), x]))
  w = y[:d_in] - y[d_in : 2 * d_in]
  np.testing.assert_allclose(y[2 * d_in :], x @ w + variables['params']['bias'], rtol=1e-4, atol=1e-4)

  p, perm = variables['params'], np.asarray(variables['constants']['perm'])
  k, n = perm.shape
  h = _hadamard(n)
  blocks = [
    np.diag(p['b'][i]) @ h @ np.eye(n)[:, perm[i]] @ np.diag(p['g'][i]) @ h @ np.diag(p['s'][i]) for i in range(k)
  ]
  formula = np.concatenate(blocks, axis=1)[:d_in, :d_out] / np.sqrt(n * d_in)
  np.testing.assert_allclose(w, formula, rtol=1e-4, atol=1e-4)


def test_fastfood_custom_vjps_match_plain_autodiff():
  """Gradients through fwht / permutation custom VJPs equal autodiff of a matmul-and-gather reference."""
  layer = st.AdaptiveFastFood(200)
  variables, x = _init(layer, 48)
  perm, n = variables['constants']['perm'], 64
  h = jnp.asarray(_hadamard(n))

  def reference(p, x):
    x_pad = jnp.pad(x, ((0, 0), (0, n - 48)))
    u = jnp.take_along_axis((x_pad[:, None, :] * p['b']) @ h, jnp.broadcast_to(perm, (3, 4, n)), axis=-1)
    y = (u * p['g']) @ h * p['s'] / np.sqrt(n * 48)
    return y.reshape(3, 4 * n)[:, :200] + p['bias']

  w = _randn(9, 3, 200)
  loss = lambda f: jax.jit(jax.grad(lambda p, x: jnp.sum(f(p, x) * w), argnums=(0, 1)))
  got = loss(lambda p, x: layer.apply({**variables, 'params': p}, x))(variables['params'], x)
  want = loss(reference)(variables['params'], x)
  for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


def test_fastfood_row_tiles_change_nothing(monkeypatch):
  """On CPU the rows go through in cache-sized tiles (lax.map): output and every gradient equal the untiled
  layer's. 2 x 150 rows at n = 64 in tiles of 32 rows (16 of each sequence): 10 tiles, the last one padded."""
  layer = st.AdaptiveFastFood(200)
  variables, x = _init(layer, 48, batch=(2, 150))
  w = _randn(9, 2, 150, 200)

  def loops_value_and_grads(tile_elements):  # fresh functions each time: jit and make_jaxpr cache by identity
    monkeypatch.setattr(st, 'TILE_ELEMENTS', tile_elements)
    f = lambda p, x: layer.apply({**variables, 'params': p}, x)
    loops = str(jax.make_jaxpr(f)(variables['params'], x)).count('scan[')
    grads = lambda p, x: jax.grad(lambda p, x: jnp.sum(f(p, x) * w), argnums=(0, 1))(p, x)
    return loops, jax.jit(lambda p, x: (f(p, x), grads(p, x)))(variables['params'], x)

  loops, tiled = loops_value_and_grads(32 * 64)
  assert loops == 1
  loops, whole = loops_value_and_grads(10**9)
  assert loops == 0
  for a, b in zip(jax.tree.leaves(tiled), jax.tree.leaves(whole)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_fastfood_row_tiles_keep_a_sharded_batch_sharded(monkeypatch):
  """The tile loop runs over positions, not over the leading (batch) axis a mesh shards: on 8 devices with the
  batch sharded, XLA gathers nothing and the output stays sharded like the input."""
  monkeypatch.setattr(st, 'TILE_ELEMENTS', 32 * 64)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ('data',))
  layer = st.AdaptiveFastFood(200)
  variables, x = _init(layer, 48, batch=(8, 40))
  x = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data')))
  apply = jax.jit(lambda v, x: layer.apply(v, x))
  hlo = apply.lower(variables, x).compile().as_text()
  assert ' while(' in hlo and 'all-gather' not in hlo
  assert apply(variables, x).sharding.spec == jax.sharding.PartitionSpec('data')


@pytest.mark.parametrize('d_in,d_out,bias', [(48, 200, True), (1024, 4096, True), (1000, 64, False)])
def test_fastfood_params_are_linear_and_match_dense_params(d_in, d_out, bias):
  layer = st.AdaptiveFastFood(d_out, use_bias=bias)
  variables = jax.eval_shape(layer.init, jax.random.key(0), jnp.ones((1, d_in)))
  count = _n_params(variables)
  assert count == st.dense_params('fastfood', d_in, d_out, use_bias=bias)
  assert count <= 3 * 2 * max(d_in, d_out) + 2 * d_out + 3 * 2 * d_in  # O(n), far below d_in * d_out
  assert st.emulated_params(d_in, d_out, bias) == d_in * d_out + bias * d_out


def test_fastfood_permutation_is_constant_and_differs_between_layers():
  class Two(nn.Module):
    perm_seed: int | None = None

    @nn.compact
    def __call__(self, x):
      return [st.AdaptiveFastFood(64, perm_seed=self.perm_seed, name=name)(x) for name in 'ab']

  variables, x = _init(Two(), 64)
  assert set(variables['params']['a']) == {'b', 'g', 's', 'bias'}
  perm_a, perm_b = variables['constants']['a']['perm'], variables['constants']['b']['perm']
  assert perm_a.dtype == jnp.int32 and perm_a.shape == (1, 64)
  assert sorted(np.asarray(perm_a[0]).tolist()) == list(range(64))
  assert not np.array_equal(perm_a, perm_b)
  # perm_seed: reproducible whatever the rng, still different per layer path.
  seeded = [_init(Two(perm_seed=3), 64, seed=k)[0]['constants'] for k in (0, 1)]
  assert np.array_equal(seeded[0]['a']['perm'], seeded[1]['a']['perm'])
  assert not np.array_equal(seeded[0]['a']['perm'], seeded[0]['b']['perm'])


@pytest.mark.parametrize('d_in,d_out', [(48, 200), (1024, 256)])
def test_fastfood_init_keeps_unit_activation_scale(d_in, d_out):
  layer = st.AdaptiveFastFood(d_out)
  variables, x = _init(layer, d_in, batch=(256,))
  std = float(jnp.std(jax.jit(layer.apply)(variables, x)))
  assert 0.5 <= std <= 2.0, std


def test_block_diagonal_dense_equals_block_diag_matrix():
  layer = st.BlockDiagonalDense(24, num_blocks=4)
  variables, x = _init(layer, 16)
  kernel = np.asarray(variables['params']['kernel'])
  assert kernel.shape == (4, 4, 6)
  want = x @ scipy.linalg.block_diag(*kernel) + variables['params']['bias']
  np.testing.assert_allclose(jax.jit(layer.apply)(variables, x), want, rtol=1e-5, atol=1e-5)
  assert _n_params(variables) == st.dense_params('blockdiag', 16, 24, num_blocks=4)


@pytest.mark.parametrize('d_in,d_out', [(18, 24), (16, 26)])
def test_block_diagonal_dense_rejects_indivisible_widths(d_in, d_out):
  with pytest.raises(ValueError, match=f'in={d_in}.*features={d_out}.*num_blocks=4'):
    st.BlockDiagonalDense(d_out, num_blocks=4).init(jax.random.key(0), jnp.ones((1, d_in)))


@pytest.mark.parametrize('nb,d', [(4, 12), (8, 64), (2, 6)])
def test_block_hadamard_equals_explicit_orthogonal_matrix(nb, d):
  layer = st.BlockHadamard(num_blocks=nb)
  variables, x = _init(layer, d)
  want_mat = np.kron(scipy.linalg.hadamard(nb), np.eye(d // nb)) / np.sqrt(nb)
  np.testing.assert_allclose(st.dense_matrix(layer, variables, d), want_mat, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(jax.jit(layer.apply)(variables, x), x @ want_mat, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='num_blocks'):
    st.BlockHadamard(num_blocks=3).init(jax.random.key(0), jnp.ones((1, 12)))


def test_blockdiag_kind_is_block_diag_then_hadamard_and_counts_match():
  layer = st.make_dense('blockdiag', num_blocks=4)(features=32, name='fc')
  variables, x = _init(layer, 16, batch=(2, 3))
  kernel = np.asarray(variables['params']['kernel'])
  want = scipy.linalg.block_diag(*kernel) @ np.kron(scipy.linalg.hadamard(4), np.eye(8)) / 2
  np.testing.assert_allclose(st.dense_matrix(layer, variables, 16), want, rtol=1e-5, atol=1e-5)
  assert _n_params(variables) == st.dense_params('blockdiag', 16, 32)
  np.testing.assert_allclose(
    jax.jit(layer.apply)(variables, x), x @ want + variables['params']['bias'], rtol=1e-5, atol=1e-5
  )


def test_make_dense_rejects_unknown_kind():
  for fn in (
    lambda: st.make_dense('bogus'),
    lambda: st.dense_params('bogus', 4, 4),
    lambda: st.dense_flops('bogus', 4, 4),
  ):
    with pytest.raises(ValueError, match="'bogus'.*dense, fastfood, blockdiag"):
      fn()


def test_make_dense_dense_kind_annotates_axes_and_counts_match():
  layer = st.make_dense('dense')(
    features=8, use_bias=True, dtype=jnp.bfloat16, param_dtype=jnp.float32, kernel_axes=('embed', 'heads'), name='q'
  )
  x = jnp.ones((2, 4))
  boxed = layer.init(jax.random.key(0), x)
  specs = nn.get_partition_spec(boxed)['params']
  assert tuple(specs['kernel']) == ('embed', 'heads') and tuple(specs['bias']) == ('heads',)
  assert layer.apply(boxed, x).dtype == jnp.bfloat16
  assert _n_params(nn.unbox(boxed)) == st.dense_params('dense', 4, 8)
  std = float(jnp.std(nn.unbox(boxed)['params']['kernel']))
  assert 0.005 < std < 0.04
  custom = st.make_dense('dense')(features=8, kernel_init=nn.initializers.ones)
  assert np.all(nn.unbox(custom.init(jax.random.key(0), x))['params']['kernel'] == 1)


@pytest.mark.parametrize('lead', [(1,), (2, 4), (3, 40)], ids=['1row', '8rows', '120rows'])
def test_out_major_dense_is_the_same_map_with_the_kernel_transposed(lead):
  """The decode layout: kernel stored [out, in] under reversed axis names; the same y for a few rows (the barrier
  path, <= FEW_ROWS) and for many (a plain dot)."""
  x = jax.random.normal(jax.random.key(1), (*lead, 16))
  plain = st.Dense(features=24, kernel_axes=('embed', 'mlp'))
  boxed = plain.init(jax.random.key(0), x)
  out_major = st.Dense(features=24, kernel_axes=('embed', 'mlp'), out_major=True)
  boxed_t = jax.eval_shape(out_major.init, jax.random.key(0), x)
  assert tuple(nn.get_partition_spec(boxed_t)['params']['kernel']) == ('mlp', 'embed')
  params = nn.unbox(boxed)['params']
  params_t = {**params, 'kernel': params['kernel'].T}
  np.testing.assert_allclose(
    jax.jit(out_major.apply)({'params': params_t}, x), plain.apply({'params': params}, x), rtol=1e-5, atol=1e-5
  )
  assert (math.prod(lead) <= st.FEW_ROWS) == (lead != (3, 40))


def test_structured_params_carry_logical_axes():
  ff = st.make_dense('fastfood')(features=32, kernel_axes=('embed', 'mlp'))
  specs = nn.get_partition_spec(jax.eval_shape(ff.init, jax.random.key(0), jnp.ones((1, 16))))['params']
  assert tuple(specs['bias']) == ('mlp',) and tuple(specs['g']) == (None, None)
  bd = st.make_dense('blockdiag')(features=32, kernel_axes=('mlp', 'embed'))
  specs = nn.get_partition_spec(jax.eval_shape(bd.init, jax.random.key(0), jnp.ones((1, 16))))['params']
  assert tuple(specs['kernel']) == (None, 'mlp', 'embed') and tuple(specs['bias']) == ('embed',)


def test_flops_accounting():
  assert st.dense_flops('dense', 1024, 4096) == 2 * 1024 * 4096
  assert st.dense_flops('fastfood', 1024, 4096) == 4 * (3 * 1024 + 2 * 1024 * 10)
  assert st.dense_flops('blockdiag', 1024, 4096, num_blocks=4) == 2 * 1024 * 4096 // 4 + 4096 * 3


@pytest.mark.parametrize('kind', st.kinds())
def test_jit_and_grad_work_through_every_layer(kind):
  layer = st.make_dense(kind)(features=24, dtype=jnp.bfloat16)
  variables, x = _init(layer, 16, batch=(2, 3))

  def loss(p, x):
    y = layer.apply({**variables, 'params': p}, x)
    return jnp.sum(y.astype(jnp.float32) ** 2), y

  (_, y), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables['params'], x)
  assert y.shape == (2, 3, 24) and y.dtype == jnp.bfloat16
  leaves = jax.tree.leaves(grads)
  assert leaves and all(bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).sum()) > 0 for g in leaves)


@pytest.mark.parametrize('mix', ['expanding', 'each'])
def test_block_diagonal_mlp_mixing(mix):
  """dense.blockdiag_mix='expanding' is seed 004's Fig. 5: block-diag -> block-Hadamard -> GELU -> block-diag (one
  transform per MLP); 'each' also mixes after the second matrix. Both 1/num_blocks of the dense params; the
  FLOPs count the transforms that run."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  from effjax.configs import gpt as gpt_config  # pylint: disable=import-outside-toplevel
  from effjax.models import layers  # pylint: disable=import-outside-toplevel

  m = gpt_config.get_config('tiny').model
  m.update(d_model=16, mlp_ratio=4, mlp_kind='blockdiag', dropout=0.0)
  m.dense.update(num_blocks=4, blockdiag_mix=mix)
  mlp = layers.Mlp(ml_collections.FrozenConfigDict(m), d_model=16, hidden=64)
  variables, x = _init(mlp, 16, batch=(2, 3))
  p = variables['params']
  mixing = lambda n: np.kron(scipy.linalg.hadamard(4), np.eye(n // 4)) / 2
  fc = np.asarray(x) @ scipy.linalg.block_diag(*p['fc']['kernel']) @ mixing(64)
  want = np.asarray(nn.gelu(fc + p['fc']['bias'])) @ scipy.linalg.block_diag(*p['proj']['kernel'])
  if mix == 'each':
    want = want @ mixing(16)
  np.testing.assert_allclose(jax.jit(mlp.apply)(variables, x), want + p['proj']['bias'], rtol=1e-4, atol=1e-4)
  assert _n_params(variables) == st.dense_params('blockdiag', 16, 64) + st.dense_params('blockdiag', 64, 16)
  opts = dict(num_blocks=4, blockdiag_mix=mix)
  assert st.dense_flops('blockdiag', 16, 64, **opts) == 2 * 16 * 64 // 4 + 64 * 3  # log2(4) + 1 per output
  assert st.dense_flops('blockdiag', 64, 16, **opts) == 2 * 64 * 16 // 4 + (16 * 3 if mix == 'each' else 0)


def test_blockdiag_presets_and_bad_mix():
  from effjax.configs import blockdiag  # pylint: disable=import-outside-toplevel
  from effjax.errors import EffjaxError  # pylint: disable=import-outside-toplevel
  from effjax.models import build_model  # pylint: disable=import-outside-toplevel

  assert blockdiag.get_config('paper').model.dense.blockdiag_mix == 'expanding'
  assert blockdiag.get_config('figure5').model.dense.blockdiag_mix == 'expanding'
  assert blockdiag.get_config('').model.dense.blockdiag_mix == 'each'
  m = blockdiag.get_config('tiny').model
  m.vocab_size = 11
  m.dense.blockdiag_mix = 'twice'
  with pytest.raises(
    EffjaxError,
    match=r"^model\.dense\.blockdiag_mix='twice' is invalid; valid values: each, "
    r'expanding',
  ):
    build_model(m)


def test_weight_decay_applies_to_the_matrices_each_kind_declares():
  """optim.decay_mask reads the kind table: dense/block-diagonal kernels and the head decay, FastFood's diagonals,
  biases, norms and (by default) embeddings do not."""
  from effjax import optim  # pylint: disable=import-outside-toplevel
  from effjax.configs import gpt as gpt_config  # pylint: disable=import-outside-toplevel
  from effjax.models import build_model  # pylint: disable=import-outside-toplevel

  m = gpt_config.get_config('tiny').model
  m.update(vocab_size=11, mlp_kind='fastfood', attn_kind='blockdiag', tie_embeddings=False)
  model = build_model(m)
  params = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))['params']
  mask = optim.decay_mask(params)
  decayed = {'/'.join(k.key for k in path) for path, v in jax.tree_util.tree_leaves_with_path(mask) if v}
  assert decayed == {
    'stack/layers/attn/query/kernel',
    'stack/layers/attn/key/kernel',
    'stack/layers/attn/value/kernel',
    'stack/layers/attn/out/kernel',
    'head/head/kernel',
  }
  with_embeddings = optim.decay_mask(params, decay_embeddings=True)
  assert with_embeddings['embed']['embedding'] and not with_embeddings['stack']['layers']['mlp']['fc']['g']
