"""Small shared pieces for the tests: tiny configs and running the CLI in a subprocess."""
from __future__ import annotations

import os
import subprocess
import sys

import jax
import ml_collections

from configs import gpt as gpt_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(corpus: str, **overrides) -> ml_collections.ConfigDict:
  """configs/gpt.py:tiny on the test corpus; overrides use dotted keys ('train.steps': 10)."""
  c = gpt_config.get_config('tiny')
  c.data.corpus = corpus
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def run_cli(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
  full_env = {**os.environ, 'JAX_PLATFORMS': 'cpu', **(env or {})}
  full_env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=1'
  return subprocess.run([sys.executable, '-m', 'effjax.main', *args], cwd=ROOT, env=full_env,
                        capture_output=True, text=True, timeout=timeout, check=False)


def one_device():
  return jax.devices()[:1]
