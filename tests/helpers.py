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
  return set_dotted(c, overrides)


def set_dotted(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
  """Sets each dotted key ('train.steps', 'pgpt.branch_impl') of `overrides` in `config`; returns `config`."""
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def tiny_config(corpus: str, **overrides) -> ml_collections.ConfigDict:
  """configs/gpt.py:tiny on the test corpus."""
  return variant_config(gpt_config, corpus, **overrides)


def xla_flags(devices: int | None = 1) -> str:
  """The session's XLA flags (tests/conftest.py) with `devices` host devices (None: no count, so a CLI run picks
  its own, effjax/runtime.py): what a CLI subprocess gets, so it compiles as fast as the test process does."""
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split() if not f.startswith('--xla_force_host_platform_device')]
  return ' '.join([*([f'--xla_force_host_platform_device_count={devices}'] if devices else []), *flags])


def run_cli(
  *args: str, timeout: float = 300, env: dict | None = None, cwd: str = ROOT, devices: int | None = 1
) -> subprocess.CompletedProcess:
  """`python -m effjax.main ARGS` on `devices` CPU devices (None: as many as the CLI picks for itself), run from
  `cwd` (the repository root unless given)."""
  full_env = {k: v for k, v in os.environ.items() if k != 'JAX_NUM_CPU_DEVICES'}
  full_env.update({'JAX_PLATFORMS': 'cpu', **(env or {})})
  full_env['XLA_FLAGS'] = xla_flags(devices)
  return subprocess.run(
    [sys.executable, '-m', 'effjax.main', *args],
    cwd=cwd,
    env=full_env,
    capture_output=True,
    text=True,
    timeout=timeout,
    check=False,
  )


def one_device():
  return jax.devices()[:1]


def train_losses(workdir) -> dict:
  """step -> loss of the train lines of a run's metrics.jsonl."""
  return {m['step']: m['loss'] for m in metrics.read_metrics(workdir) if m['split'] == 'train'}


def close(a, b, atol=1e-5):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=1e-5)


def assert_causal(model, variables, tokens_T, positions=(0, 5, 11)):
  """Changing the token at position t' leaves every logit before t' bit-identical and changes the logits at t'
  and at every later position (the model sees its past, and only its past): one forward pass over the sequence
  and one copy per t' with that token replaced."""
  tokens_T = jnp.asarray(tokens_T, jnp.int32)
  vocab = model.cfg.vocab_size
  changed = [tokens_T.at[t].set((tokens_T[t] + 1 + vocab // 2) % vocab) for t in positions]
  logits_BxTxV = np.asarray(jax.jit(model.apply)(variables, jnp.stack([tokens_T, *changed])))
  for i, t in enumerate(positions, start=1):
    np.testing.assert_array_equal(logits_BxTxV[i, :t], logits_BxTxV[0, :t], err_msg=f'position {t} leaks back')
    moved = np.abs(logits_BxTxV[i, t:] - logits_BxTxV[0, t:]).max(-1)
    assert np.all(moved > 0), (t, moved)
