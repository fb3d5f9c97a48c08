"""Every test sees 8 CPU devices, so sharding is exercised without accelerators."""
import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402  pylint: disable=wrong-import-position
import pytest  # noqa: E402  pylint: disable=wrong-import-position

assert jax.device_count() == 8, 'tests need 8 CPU devices; XLA_FLAGS was set too late'


@pytest.fixture(scope='session')
def corpus_dir(tmp_path_factory):
  """A small Python-like corpus written by the tests themselves (no download, no dependence on the stdlib)."""
  root = tmp_path_factory.mktemp('corpus')
  for i in range(24):
    lines = [f'def function_{i}_{j}(x, y={j}):\n    """Return x plus {j}."""\n    return x + y * {i}\n\n'
             for j in range(40)]
    (root / f'module_{i:02d}.py').write_text(''.join(lines), encoding='utf-8')
  return str(root)
