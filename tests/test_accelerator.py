"""train.require_backend, the persistent compilation cache and the profiler window (effjax/accelerator.py), on CPU."""

from __future__ import annotations

import glob
import os

import pytest

from tests.helpers import run_cli
from tests.test_bad_input import assert_one_error_line


@pytest.mark.slow
def test_required_accelerator_missing_is_one_line_and_writes_nothing(tmp_path, corpus_dir):
  workdir = tmp_path / 'run'
  for backend in ('gpu', 'tpu'):
    result = run_cli(
      '--config=gpt:tiny',
      f'--workdir={workdir}',
      f'--config.data.corpus={corpus_dir}',
      f'--config.train.require_backend={backend}',
    )
    assert result.returncode == 2
    line = assert_one_error_line(
      result.returncode, result.stderr, rf"train.require_backend='{backend}' but jax's backend is 'cpu'"
    )
    assert f'effjax[{"cuda" if backend == "gpu" else "tpu"}]' in line
    assert not workdir.exists()


def test_bad_runtime_settings_are_one_line(tmp_path, corpus_dir):
  for key, value, pattern in (
    ('require_backend', 'cuda', r"train.require_backend='cuda' is invalid"),
    ('profile_steps', '(5, 2)', r'train.profile_steps=\(5, 2\) is invalid'),
  ):
    result = run_cli(
      '--config=gpt:tiny',
      f'--workdir={tmp_path / "run"}',
      f'--config.data.corpus={corpus_dir}',
      f'--config.train.{key}={value}',
    )
    assert result.returncode == 2
    assert_one_error_line(result.returncode, result.stderr, pattern)
    assert not (tmp_path / 'run').exists()


@pytest.mark.slow
def test_compile_cache_and_profile_window(tmp_path, corpus_dir):
  workdir, cache = tmp_path / 'run', tmp_path / 'cache'
  result = run_cli(
    '--config=gpt:tiny',
    f'--workdir={workdir}',
    f'--config.data.corpus={corpus_dir}',
    '--config.train.steps=6',
    '--config.train.log_every=2',
    f'--config.train.compile_cache_dir={cache}',
    '--config.train.profile_steps=(3, 4)',
    env={'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0'},
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'profiling steps 3..4' in result.stderr
  traces = glob.glob(str(workdir / 'profile' / 'plugins' / 'profile' / '*' / '*.xplane.pb'))
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 1000
  entries = os.listdir(cache)
  assert len(entries) >= 2  # the train step and the evaluation step at least
  assert not (workdir / 'compile_cache').exists()

  # 'auto' (the default) keeps no cache on CPU
  other = tmp_path / 'auto'
  result = run_cli(
    '--config=gpt:tiny', f'--workdir={other}', f'--config.data.corpus={corpus_dir}', '--config.train.steps=2'
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert not (other / 'compile_cache').exists() and not (other / 'profile').exists()
