"""Small shared pieces for the tests: tiny configs and running the CLI in a subprocess."""
from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from effjax.configs import gpt as gpt_config
from effjax import metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def variant_config(variant, corpus: str, preset: str = 'tiny', **overrides) -> ml_collections.ConfigDict:
  """A configs/<variant>.py preset on the test corpus; overrides use dotted keys ('train.steps': 10)."""
  c = variant.get_config(preset)
  c.data.corpus = corpus
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def tiny_config(corpus: str, **overrides) -> ml_collections.ConfigDict:
  """configs/gpt.py:tiny on the test corpus."""
  return variant_config(gpt_config, corpus, **overrides)


def run_cli(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
  full_env = {**os.environ, 'JAX_PLATFORMS': 'cpu', **(env or {})}
  full_env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=1'
  return subprocess.run([sys.executable, '-m', 'effjax.main', *args], cwd=ROOT, env=full_env,
                        capture_output=True, text=True, timeout=timeout, check=False)


def one_device():
  return jax.devices()[:1]


def train_losses(workdir) -> dict:
  """step -> loss of the train lines of a run's metrics.jsonl."""
  return {m['step']: m['loss'] for m in metrics.read_metrics(workdir) if m['split'] == 'train'}


def close(a, b, atol=1e-5):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=1e-5)


def assert_causal(model, variables, tokens_1xT, positions=(0, 5, 11)):
  """|d logits[t] / d embedding-row(token at t')| summed: zero for every t' > t, non-zero for t' <= t.

  Every position holds a distinct token, so a row of the token table is one position's input."""
  emb = variables['params']['embed']['embedding']

  def logits_at(table, t):
    params = {**variables['params'], 'embed': {**variables['params']['embed'], 'embedding': table}}
    return model.apply({**variables, 'params': params}, tokens_1xT)[0, t].sum()

  grads = jax.jit(jax.vmap(jax.grad(logits_at), in_axes=(None, 0)))(emb, jnp.asarray(positions))
  norms = np.asarray(jnp.abs(grads[:, tokens_1xT[0]]).sum(-1))
  for t, row in zip(positions, norms):
    assert np.all(row[t + 1:] == 0.0), (t, row)
    assert np.all(row[:t + 1] > 0.0), (t, row)
