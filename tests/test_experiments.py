"""The experiment tooling: the PyTorch reference is the same model, the power-law fitter, sweep resume, pruning."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from effjax.configs import gpt as gpt_config
from effjax import accounting
from effjax.models import build_model
from experiments import bench, prune_layers, scaling

torch = pytest.importorskip('torch')
from experiments import torch_gpt  # noqa: E402  pylint: disable=wrong-import-position


def tiny_model(**overrides):
  m = gpt_config.get_config('tiny').model
  m.update(vocab_size=50, num_layers=2, d_model=32, num_heads=4, max_len=16)
  m.update(overrides)
  return m


def init(m, length=16):
  model = build_model(m)
  return model, nn.unbox(model.init(jax.random.key(0), jnp.zeros((2, length), jnp.int32)))


# ------------------------------------------------------------------------------------------- torch reference
REFERENCE_VARIANTS = [
  {},
  dict(pos_emb='rotary'),
  dict(tie_embeddings=False, head_bias=True),
  dict(norm='rmsnorm', use_bias=False),
  dict(norm_position='post', final_norm=False),
  dict(scan_layers=False),
]


@pytest.mark.parametrize('overrides', REFERENCE_VARIANTS, ids=lambda o: ','.join(o) or 'default')
def test_torch_reference_has_effjax_param_count(overrides):
  m = tiny_model(**overrides)
  assert torch_gpt.num_params(torch_gpt.TorchGPT(m)) == accounting.param_counts(m)['total_params']


def test_torch_reference_param_count_at_bench_size():
  m = bench.bench_config('gpt', bench.SIZES[bench.TARGET_SIZE]).model
  assert torch_gpt.num_params(torch_gpt.TorchGPT(m)) == accounting.param_counts(m)['total_params']


@pytest.mark.slow
@pytest.mark.parametrize('overrides', REFERENCE_VARIANTS, ids=lambda o: ','.join(o) or 'default')
def test_torch_reference_same_logits_from_copied_weights(overrides):
  m = tiny_model(**overrides)
  model, variables = init(m)
  ref = torch_gpt.TorchGPT(m)
  torch_gpt.load_effjax_params(ref, variables['params'])
  tokens = np.random.default_rng(0).integers(0, m.vocab_size, (2, 16)).astype(np.int32)
  ours = np.asarray(model.apply(variables, jnp.asarray(tokens)))
  theirs = ref(torch.from_numpy(tokens).long()).detach().numpy()
  np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4)


def test_torch_reference_rejects_other_families():
  with pytest.raises(ValueError, match='plain GPT'):
    torch_gpt.TorchGPT(tiny_model(share_layers='all'))


@pytest.mark.slow
def test_torch_train_step_lowers_the_loss():
  m = tiny_model()
  c = gpt_config.get_config('tiny')
  c.model = m
  ref = torch_gpt.TorchGPT(m)
  step = torch_gpt.make_train_step(ref, torch_gpt.make_optimizer(ref, c.train))
  tokens = torch.randint(0, m.vocab_size, (4, 17))
  losses = [float(step(tokens[:, :-1], tokens[:, 1:])) for _ in range(8)]
  assert losses[-1] < losses[0]


@pytest.mark.slow
def test_bench_configs_build_for_every_family():
  for size in (*bench.SIZES.values(), *bench.QUICK_SIZES.values()):
    for family in bench.FAMILIES:
      c = bench.bench_config(family, size)
      assert accounting.param_counts(c.model)['trainable_params'] > 0, family
  with pytest.raises(SystemExit):
    bench.parse(['--only', 'train,nope'])


def test_speed_ceiling_is_the_steps_flops_at_the_best_matmul_rate():
  size = dict(
    flops_per_token_fwd=1e6,
    batch=4,
    seq_len=8,
    peak_flops_best=1e10,
    rows=[dict(impl='effjax', step_ms=30.0), dict(impl='torch eager', step_ms=20.0)],
  )
  c = bench.speed_ceiling(size)  # 3 x 1e6 x 32 = 96 MFLOP at 10 GFLOP/s: 9.6 ms
  assert c['bound_ms'] == pytest.approx(9.6)
  assert c['max_speedup'] == {'torch eager': pytest.approx(20.0 / 9.6)}


def test_structured_roofline_counts_a_training_steps_work(monkeypatch):
  """bench_structured's layer timing computes y and both gradients (XLA's cost analysis of a dense layer shows
  all three matmuls), and its bounds are ordered: the interface-only floor is never above the compiled bound."""
  from experiments import bench_structured as bs  # pylint: disable=import-outside-toplevel

  for name, value in dict(ROUNDS=1, WARMUP=1, ROWS=32, STREAM_MB=4, PEAK_N=128).items():
    monkeypatch.setattr(bs, name, value)
  machine = bs.measure_machine()
  assert machine['peak_flops'] > 1e8 and machine['bandwidth'] > 1e8
  rows = {r['impl']: r for r in bs.bench_layer(64, 256, machine)}
  assert rows['dense']['compiled_flops'] == pytest.approx(3 * 2 * 32 * 64 * 256, rel=0.02)
  assert rows['dense']['interface_bytes'] == 4 * (2 * 32 * 64 + 2 * 32 * 256 + 2 * (64 * 256 + 256))
  for r in rows.values():
    assert r['compiled_bytes'] >= r['interface_bytes'] > 0
    assert 0 < r['floor_ms'] <= r['bound_ms']
    assert r['pct_of_bound'] == pytest.approx(100 * r['bound_ms'] / r['ms'])


def test_scan_unroll_default_chooses_by_backend_and_depth():
  """-1 (the default): unrolled on CPU up to AUTO_UNROLL_MAX_LAYERS layers, rolled beyond; explicit values kept."""
  from effjax.models import layers  # pylint: disable=import-outside-toplevel

  assert jax.default_backend() == 'cpu'
  cfg = lambda u: {'cfg': ml_collections.FrozenConfigDict({'scan_unroll': u})}
  assert layers.scan_unroll(cfg(-1), 6) == 6
  assert layers.scan_unroll(cfg(-1), layers.AUTO_UNROLL_MAX_LAYERS) == layers.AUTO_UNROLL_MAX_LAYERS
  assert layers.scan_unroll(cfg(-1), layers.AUTO_UNROLL_MAX_LAYERS + 1) == 1
  assert layers.scan_unroll(cfg(1), 6) == 1 and layers.scan_unroll(cfg(2), 6) == 2
  assert layers.scan_unroll(cfg(0), 48) == 48


@pytest.mark.slow
def test_scan_unroll_keeps_params_and_values():
  """model.scan_unroll changes the compiled loop, not the model: the rolled scan (1) and the full unroll (0)
  give the same parameters, loss and gradients."""
  import optax  # pylint: disable=import-outside-toplevel

  m, mu = tiny_model(num_layers=4, scan_unroll=1), tiny_model(num_layers=4, scan_unroll=0)
  model, variables = init(m)
  unrolled_model, unrolled_vars = init(mu)
  assert jax.tree.structure(variables) == jax.tree.structure(unrolled_vars)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, m.vocab_size, (2, 17)))

  def loss(mod):
    return lambda p: optax.softmax_cross_entropy_with_integer_labels(
      mod.apply({'params': p}, tokens[:, :-1]), tokens[:, 1:]
    ).mean()

  la, ga = jax.jit(jax.value_and_grad(loss(model)))(variables['params'])
  lb, gb = jax.jit(jax.value_and_grad(loss(unrolled_model)))(variables['params'])
  assert float(la) == pytest.approx(float(lb), abs=1e-6)
  for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    np.testing.assert_allclose(x, y, atol=1e-7)


# ---------------------------------------------------------------------------------------------- power laws
@pytest.mark.parametrize('exponent', [0.05, 0.3])
def test_power_law_fit_recovers_exponent(exponent):
  rng = np.random.default_rng(0)
  x = np.geomspace(1e5, 1e9, 8)
  y = 7.0 * x**-exponent * np.exp(rng.normal(0, 0.002, x.shape))
  fit = scaling.fit_power_law(x, y)
  assert fit['exponent'] == pytest.approx(-exponent, abs=0.01)
  assert fit['b_err'] < 0.01 and fit['a'] == pytest.approx(7.0, rel=0.1)


def test_power_law_fit_with_irreducible_term():
  x = np.geomspace(1e4, 1e9, 12)
  y = 1.5 + 40.0 * x**-0.25
  fit = scaling.fit_power_law(x, y, irreducible=True)
  assert fit['exponent'] == pytest.approx(-0.25, abs=0.01)
  assert fit['c'] == pytest.approx(1.5, abs=0.05)
  np.testing.assert_allclose(scaling.predict(fit, x), y, rtol=1e-3)


def test_power_law_fit_needs_enough_points():
  assert scaling.fit_power_law([1, 2], [3, 2]) is None


def test_pareto_frontier():
  pts = [(1, 5.0), (2, 4.0), (3, 4.5), (4, 3.0), (4, 3.5), (5, 3.2)]
  assert scaling.pareto_frontier(pts) == [(1, 5.0), (2, 4.0), (4, 3.0)]


# ------------------------------------------------------------------------------------------- sweep / resume
@pytest.mark.slow
def test_sweep_resume_skips_finished_runs(tmp_path, corpus_dir):
  runs = scaling.sweep_runs('quick', steps=4)[:1]
  root = str(tmp_path / 'runs')
  calls = []

  def stop_early(config, workdir, **kw):
    from effjax import train  # pylint: disable=import-outside-toplevel

    calls.append(workdir)
    config.train.stop_at = 2  # as if interrupted: checkpointed at step 2
    return train.train_and_evaluate(config, workdir, **kw)

  results, complete = scaling.run_sweep(runs, root, 'quick', corpus=corpus_dir, progress=False, train_fn=stop_early)
  assert not complete and results == [] and len(calls) == 1
  results, complete = scaling.run_sweep(runs, root, 'quick', corpus=corpus_dir, progress=False)  # resumes
  assert complete and len(results) == 1
  assert [p['step'] for p in results[0]['curve']][-1] == 4
  from effjax import metrics  # pylint: disable=import-outside-toplevel

  logged = [r['step'] for r in metrics.read_metrics(os.path.join(root, runs[0].name)) if r['split'] == 'train']
  assert logged == [2, 4]  # resumed from the step-2 checkpoint, not restarted
  assert json.load(open(os.path.join(root, runs[0].name, 'result.json'), encoding='utf-8'))['final_loss'] > 0

  def must_not_train(*a, **kw):
    raise AssertionError('a finished run was trained again')

  again, complete = scaling.run_sweep(runs, root, 'quick', corpus=corpus_dir, progress=False, train_fn=must_not_train)
  assert complete and again == results


@pytest.mark.slow
def test_analyse_and_plot(tmp_path):
  def fake(name, family, n, loss, frozen=0):
    curve = [
      dict(
        step=s,
        loss=loss * (1 + 1.0 / s),
        tokens=s * 64,
        compute=s * 6.0 * (n + frozen * 2 / 3) * 64,
        compute_frozen_free=s * 6.0 * n * 64,
        bpb=1.0,
      )
      for s in (50, 100, 200)
    ]
    return dict(
      name=name,
      family=family,
      layers=2,
      d_model=int(n),
      final_loss=curve[-1]['loss'],
      non_embedding_trainable_params=n,
      non_embedding_total_params=n + frozen,
      emulated_non_embedding_params=n + frozen,
      frozen_params=frozen,
      curve=curve,
      steps=200,
      final_bpb=1.0,
      train_tokens_per_sec=1.0,
    )

  results = [fake(f'baseline-{i}', 'baseline', n, 6 * n**-0.1) for i, n in enumerate([1e4, 3e4, 1e5, 3e5])]
  results.append(fake('doped-x', 'doped', 3e4, 6 * 3e4**-0.1, frozen=5e4))
  analysis = scaling.analyse(results, warmup_steps=10)
  assert analysis['fits']['L(N)']['exponent'] == pytest.approx(-0.1, abs=0.01)
  doped = analysis['deviations'][-1]
  assert abs(doped['vs_L(N)_trainable']) < 0.01 < doped['vs_L(N)_all']
  paths = scaling.plot(results, analysis, str(tmp_path / 'fig'))
  assert all(os.path.getsize(p) > 0 for p in paths)
  assert 'L(N)' in scaling.markdown(results, analysis, 'fake', paths, {'note': ''})


def test_shards_split_the_cpu_sweep_into_disjoint_balanced_parts():
  runs = scaling.sweep_runs('cpu')
  assert len(runs) == 3 * (2 + 5 * 4) and len({r.name for r in runs}) == len(runs)
  parts = [scaling.shard(runs, 'cpu', f'{i}/2') for i in range(2)]
  assert sorted(r.name for p in parts for r in p) == sorted(r.name for r in runs)
  cost = [sum(scaling._step_cost(scaling.run_config(r, 'cpu')) for r in p) for p in parts]  # pylint: disable=protected-access
  assert max(cost) / min(cost) < 1.1
  for bad in ('2/2', 'x', '1/0'):
    with pytest.raises(SystemExit, match='--shard'):
      scaling.shard(runs, 'cpu', bad)


def test_per_seed_analysis_and_bootstrap_over_runs():
  """Each seed's doped run is compared with the baseline of its own shape and seed, each kind is averaged over its
  shapes against its seed's own baseline fit, and the bootstrap resamples runs within each size (three seeds
  with different losses give an interval that contains the pooled exponent)."""
  results = []
  for seed, noise in ((0, 1.00), (1, 1.01), (2, 0.99)):
    for layers, d, n in ((2, 32, 1e4), (2, 48, 3e4), (2, 64, 1e5), (3, 96, 3e5)):
      loss = 6 * n**-0.1 * noise
      results.append(
        dict(
          name=f'baseline-{layers}x{d}-s{seed}',
          family='baseline',
          seed=seed,
          layers=layers,
          d_model=d,
          final_loss=loss,
          non_embedding_trainable_params=n,
          non_embedding_total_params=n,
          emulated_non_embedding_params=n,
          curve=[
            dict(step=s, loss=loss * (1 + 1 / s), compute=s * 6 * n, compute_frozen_free=s * 6 * n) for s in (50, 100)
          ],
        )
      )
    doped = dict(results[-2], name=f'doped-2x64-s{seed}', family='doped', final_loss=results[-2]['final_loss'] * 1.03)
    doped['non_embedding_total_params'] = doped['emulated_non_embedding_params'] = 2e5
    results.append(doped)
  analysis = scaling.analyse(results, warmup_steps=10, reps=200)
  per = analysis['per_seed']
  assert sorted(per) == ['0', '1', '2']
  for seed in per.values():
    assert seed['doped_vs_same_blocks'] == {'2x64': pytest.approx(0.03)}
    assert seed['kinds']['doped']['vs_L(N)_trainable'] == pytest.approx(0.03, abs=0.02)
    assert seed['exponents']['L(N)'] == pytest.approx(-0.1, abs=0.02)
  boot = analysis['bootstrap']['L(N)']
  assert boot['runs'] == 12 and boot['sizes'] == 4 and boot['lo'] < boot['hi']
  assert boot['lo'] <= analysis['fits']['L(N)']['exponent'] <= boot['hi']
  table = '\n'.join(scaling._markdown_seeds(analysis))  # pylint: disable=protected-access
  assert '| doped-2x64 | vs baseline-2x64 | +3.00% | +3.00% | +3.00% | +3.00% ± 0.00% |' in table


# ------------------------------------------------------------------------------------------------- pruning
@pytest.mark.slow
@pytest.mark.parametrize('scan', [True, False])
def test_prune_removes_last_blocks_and_runs(scan):
  c = gpt_config.get_config('tiny')
  c.model = tiny_model(num_layers=4, scan_layers=scan)
  model, variables = init(c.model)
  tokens = jnp.ones((2, 16), jnp.int32)
  full = model.apply(variables, tokens)
  for k in range(4):
    pc, pv = prune_layers.prune(c, variables, k)
    assert pc.model.num_layers == 4 - k and c.model.num_layers == 4
    if scan:
      assert all(x.shape[0] == 4 - k for x in jax.tree.leaves(pv['params']['stack']['layers']))
    else:
      assert sorted(pv['params']['stack']) == [f'layer_{i}' for i in range(4 - k)]
    logits = build_model(pc.model).apply(pv, tokens)
    assert logits.shape == full.shape and np.all(np.isfinite(logits))
    if k == 0:
      np.testing.assert_array_equal(logits, full)
  # the pruned model is the original network cut after block L-k: its params are a prefix of the original's
  pc, pv = prune_layers.prune(c, variables, 1)
  if scan:
    np.testing.assert_array_equal(
      pv['params']['stack']['layers']['mlp']['fc']['kernel'],
      variables['params']['stack']['layers']['mlp']['fc']['kernel'][:3],
    )
  with pytest.raises(ValueError):
    prune_layers.prune(c, variables, 4)


@pytest.mark.slow
def test_prune_finetune_and_evaluate(tmp_path, corpus_dir):
  from effjax import train  # pylint: disable=import-outside-toplevel

  c = gpt_config.get_config('tiny')
  c.model.update(num_layers=3, d_model=32, num_heads=4, max_len=16)
  c.data.update(corpus=corpus_dir, seq_len=16)
  c.train.update(batch_size=4, eval_batches=1)
  bundle, c = train.load_data(c, str(tmp_path))
  _, variables = init(c.model)
  pc, pv = prune_layers.prune(c, variables, 2)
  batches = prune_layers.val_batches(pc, bundle)
  before = prune_layers.evaluate(pc, pv, batches)
  tuned = prune_layers.finetune(pc, pv, bundle, steps=6, lr=3e-3)
  after = prune_layers.evaluate(pc, tuned, batches)
  assert np.isfinite(before) and after < before
  assert prune_layers.evaluate(pc, pv, batches) == pytest.approx(before)  # the donated step left pv alive
  summary = prune_layers.summarize(
    dict(
      num_layers=4, rows=[dict(k=k, loss_before=2.0 + k, loss_after=2.0 + (0.001 if k < 2 else 0.5)) for k in range(4)]
    )
  )
  assert summary['max_removable_after_finetune'] == 1 and summary['max_removable_before_finetune'] == 0


def test_peak_rss_sums_the_process_tree():
  """experiments.peak_rss: two child processes holding ~150 MB each count twice, the largest one once."""
  import sys  # pylint: disable=import-outside-toplevel
  from experiments import peak_rss  # pylint: disable=import-outside-toplevel

  code = (
    'import subprocess, sys; hold = "import numpy, time; a = numpy.ones(20_000_000); time.sleep(1.5)"; '
    'ps = [subprocess.Popen([sys.executable, "-c", hold]) for _ in range(2)]; [p.wait() for p in ps]'
  )
  result = peak_rss.measure([sys.executable, '-c', code], interval=0.1)
  assert result['returncode'] == 0
  assert 150 < result['peak_single_rss_mb'] < 260
  assert result['peak_tree_rss_mb'] > 1.8 * 150


@pytest.mark.slow
def test_bench_decode_greedy_tokens_match_transformers(tmp_path):
  """experiments/bench_decode.py on a small GPT-2 shape: effjax's KV-cache decoding of the imported model gives
  exactly the tokens of transformers' greedy generate, the table has a row per implementation and batch, and the
  weight-streaming floor reads every weight matrix once."""
  from experiments import bench_decode  # pylint: disable=import-outside-toplevel

  result = bench_decode.main(
    [
      '--layers=2',
      '--width=64',
      '--heads=4',
      '--vocab=512',
      '--ctx=128',
      '--new_tokens=24',
      '--batches=1,3',
      '--rounds=1',
      f'--out={tmp_path}/bd',
    ]
  )
  rows = {(r['impl'], r['batch']): r for r in result['rows']}
  assert set(rows) == {(i, b) for i in ('effjax', 'transformers') for b in (1, 3)}
  for b in (1, 3):
    assert rows[('effjax', b)]['greedy_identical'] and rows[('effjax', b)]['greedy_agreement'] == 1.0
    assert all(r['whole_s'] > 0 and r['tokens_per_sec'] > 0 for r in rows.values())
  assert (tmp_path / 'bd.md').read_text().count('| effjax |') == 2
  # the floor streams every weight matrix once: 2 layers of q, k, v, out (64x64) and fc, proj (64x256), the head
  weight_bytes = 4 * (2 * (4 * 64 * 64 + 2 * 64 * 256) + 512 * 64)
  for b in (1, 3):
    ours, theirs = rows[('effjax', b)], rows[('transformers', b)]
    assert ours['floor_bytes'] == weight_bytes and ours['floor_ms'] > 0
    assert ours['floor_allows'] == pytest.approx(theirs['per_token_ms'] / ours['floor_ms'])
