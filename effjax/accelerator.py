"""What long runs on accelerators need around the train step: the backend they asked for, a persistent
compilation cache, and a profiler trace of a chosen window of steps.

- `train.require_backend` ('' = any, 'cpu', 'gpu', 'tpu'): a run that asked for GPUs or TPUs and got jax's CPU
  backend (a CPU-only jaxlib, no visible device, a driver mismatch) stops with one line before writing anything.
- `train.compile_cache_dir`: 'auto' (the default) caches compiled programs in DIR/compile_cache on GPU and TPU
  (with a gs:// workdir the cache outlives the VM and is shared by its hosts) and not at all on CPU; '' or 'off'
  disables it; any other value is the directory to use (local or gs://), on any backend.
- `train.profile_steps=(A, B)`: a jax.profiler trace of steps A..B (as logged, 1-based) in DIR/profile (open it
  with TensorBoard's profile plugin or xprof). With a gs:// workdir the trace is written to a local temporary
  directory and uploaded when it stops.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import jax
from absl import logging

from effjax import paths
from effjax.errors import EffjaxError

BACKENDS = ('', 'cpu', 'gpu', 'tpu')
ACCELERATOR_EXTRA = {
  'gpu': "pip install 'effjax[cuda]' (CUDA 12; '[cuda13]' for CUDA 13)",
  'tpu': "pip install 'effjax[tpu]'",
}


def check_config(t) -> None:
  want = t.get('require_backend', '')
  if want not in BACKENDS:
    raise EffjaxError(
      f"train.require_backend={want!r} is invalid; valid: {', '.join(map(repr, BACKENDS))} ('' accepts any backend)"
    )
  window = t.get('profile_steps', (0, 0))
  if (
    not isinstance(window, (tuple, list))
    or len(window) != 2
    or not all(isinstance(s, int) for s in window)
    or tuple(window) != (0, 0)
    and not 0 < window[0] <= window[1]
  ):
    raise EffjaxError(
      f'train.profile_steps={window!r} is invalid; give (first, last) steps with 0 < first <= '
      "last, e.g. --config.train.profile_steps='(10, 15)', or (0, 0) for no trace"
    )


def check_backend(t) -> None:
  """The one-line stop for a run that asked for an accelerator and got another backend."""
  want = t.get('require_backend', '')
  got = jax.default_backend()
  if want and got != want:
    how = (
      f'install the {want.upper()} build of jax ({ACCELERATOR_EXTRA[want]}) and check'
      if want in ACCELERATOR_EXTRA
      else 'check'
    )
    raise EffjaxError(
      f"train.require_backend={want!r} but jax's backend is {got!r}; {how} that the devices are "
      'visible to this process (drivers, CUDA_VISIBLE_DEVICES, JAX_PLATFORMS), or set '
      "train.require_backend=''"
    )


def compile_cache_dir(t, workdir: str) -> str | None:
  value = str(t.get('compile_cache_dir', 'auto') or '').strip()
  if value in ('', 'off', 'none'):
    return None
  if value == 'auto':
    return paths.join(workdir, 'compile_cache') if jax.default_backend() in ('gpu', 'tpu') else None
  return value


def enable_compile_cache(t, workdir: str) -> str | None:
  """Turns on jax's persistent compilation cache (called once the run is known to proceed: a refused run writes
  no cache entries). Returns the directory, or None when it stays off."""
  directory = compile_cache_dir(t, workdir)
  if directory is None:
    return None
  paths.check(directory, 'train.compile_cache_dir')
  from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=import-outside-toplevel

  compilation_cache.set_cache_dir(directory)
  compilation_cache.reset_cache()  # re-read the setting even if something compiled earlier in this process
  logging.info('persistent compilation cache: %s', directory)
  return directory


class StepProfiler:
  """Starts a jax.profiler trace before step `first` and stops it after step `last` (the step is synced first,
  so the trace holds its device work)."""

  def __init__(self, window, workdir: str):
    self.first, self.last = tuple(window) if window else (0, 0)
    self.target = paths.join(workdir, 'profile')
    self._local = None
    self.active = False

  def before(self, step: int) -> None:
    if self.first and step == self.first and not self.active:
      self._local = tempfile.mkdtemp(prefix='effjax_profile_') if paths.is_remote(self.target) else self.target
      jax.profiler.start_trace(self._local)
      self.active = True
      logging.info('profiling steps %d..%d into %s', self.first, self.last, self.target)

  def after(self, step: int, result) -> None:
    if self.active and step >= self.last:
      jax.block_until_ready(result)
      self.stop()

  def stop(self) -> None:
    if not self.active:
      return
    jax.profiler.stop_trace()
    self.active = False
    if self._local != self.target:  # gs://: upload the files written locally
      for root, _, files in os.walk(self._local):
        for name in files:
          src = os.path.join(root, name)
          paths.copy_file(src, paths.join(self.target, os.path.relpath(src, self._local)))
      shutil.rmtree(self._local, ignore_errors=True)
