"""Every test sees 8 CPU devices, so sharding is exercised without accelerators.

One persistent compilation cache serves the whole session (the xdist workers and the CLI processes the tests
start inherit it): the same tiny programs are compiled many times across tests, and from the second time on they
load. A session makes its own empty directory (removed at exit), so no run reads another's entries; the size
limit turns on jax's file lock, so processes never read an entry another one is still writing. Tests that check
the cache itself point the run at their own directory.

XLA's LLVM backend runs at -O0 in the tests (`--xla_backend_optimization_level=0`; the HLO passes, fusion and
SPMD partitioning are unchanged): the tests check values, never speed, and most of their time is compiling tiny
programs, which this cuts by about a third. CLI subprocesses get the same flags (helpers.xla_flags).
"""

import atexit
import os
import shutil
import tempfile

_flags = os.environ.get('XLA_FLAGS', '')
if '--xla_backend_optimization_level' not in _flags:
  _flags += ' --xla_backend_optimization_level=0'
os.environ['XLA_FLAGS'] = (_flags + ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:  # the first process of the session (workers inherit it)
  _cache = tempfile.mkdtemp(prefix='effjax-tests-jax-cache-')
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ.update(
    JAX_COMPILATION_CACHE_DIR=_cache,
    JAX_COMPILATION_CACHE_MAX_SIZE=str(8 << 30),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0.2',
  )

import jax  # noqa: E402  pylint: disable=wrong-import-position
import pytest  # noqa: E402  pylint: disable=wrong-import-position

assert jax.device_count() == 8, 'tests need 8 CPU devices; XLA_FLAGS was set too late'


@pytest.fixture(scope='session')
def corpus_dir(tmp_path_factory):
  """A small Python-like corpus written by the tests themselves (no download, no dependence on the stdlib)."""
  root = tmp_path_factory.mktemp('corpus')
  for i in range(24):
    lines = [
      f'def function_{i}_{j}(x, y={j}):\n    """Return x plus {j}."""\n    return x + y * {i}\n\n' for j in range(40)
    ]
    (root / f'module_{i:02d}.py').write_text(''.join(lines), encoding='utf-8')
  return str(root)
