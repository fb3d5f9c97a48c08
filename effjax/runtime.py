"""Process settings a run makes for itself before jax starts, so that users need not export them by hand.

Huge pages: XLA:CPU allocates and frees large activation buffers every step; with 4 KiB pages a 6-layer/384-wide
training step takes ~123k page faults, with transparent huge pages ~300 (experiments/bench.py records both).
glibc's malloc asks for huge pages only when GLIBC_TUNABLES says `glibc.malloc.hugetlb=1`, and glibc reads that
once at process start, so the CLI re-executes itself with it (same pid, same arguments) when the kernel offers
transparent huge pages and the variable is not already set. EFFJAX_NO_REEXEC=1 turns this off.

CPU devices: XLA:CPU splits every op of a step over all cores, and a small op pays a hand-off per core; a
training run instead gives XLA:CPU one device per core (config.mesh.cpu_devices, effjax.sharding.cpu_device_count)
so that the data axis of the mesh runs one shard of the batch per core. The count is fixed when jax starts its
backends, so it is set before that, and only where the user has not set one (XLA_FLAGS'
--xla_force_host_platform_device_count, JAX_NUM_CPU_DEVICES) or the config names it.
"""

from __future__ import annotations

import os
import re
import sys

HUGETLB = 'glibc.malloc.hugetlb=1'
NO_REEXEC = 'EFFJAX_NO_REEXEC'
USER_CPU_DEVICES = ('--xla_force_host_platform_device_count', 'JAX_NUM_CPU_DEVICES')  # in XLA_FLAGS / the env
THP_ENABLED = '/sys/kernel/mm/transparent_hugepage/enabled'


def transparent_hugepages(path: str = THP_ENABLED) -> str | None:
  """The kernel's THP mode ('always', 'madvise', 'never'), or None where there is no such setting."""
  try:
    with open(path, encoding='ascii') as f:
      match = re.search(r'\[(\w+)\]', f.read())
  except OSError:
    return None
  return match.group(1) if match else None


def hugepage_environment(environ, thp_mode: str | None) -> dict | None:
  """The environment to re-execute with, or None when it would change nothing (not Linux, THP off, the tunable
  already set, or opted out)."""
  if not sys.platform.startswith('linux') or environ.get(NO_REEXEC) or thp_mode not in ('always', 'madvise'):
    return None
  tunables = environ.get('GLIBC_TUNABLES', '')
  if 'glibc.malloc.hugetlb' in tunables:
    return None
  return {**environ, 'GLIBC_TUNABLES': f'{tunables}:{HUGETLB}' if tunables else HUGETLB}


def reexec_with_hugepages() -> None:
  """Replace this process by itself with huge pages enabled (returns only when nothing needs to change)."""
  env = hugepage_environment(os.environ, transparent_hugepages())
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def usable_cores() -> int:
  """Cores this process may run on (its affinity mask: a SLURM or taskset allocation, not the whole machine)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def user_chose_cpu_devices(environ) -> bool:
  return USER_CPU_DEVICES[0] in environ.get('XLA_FLAGS', '') or bool(environ.get(USER_CPU_DEVICES[1]))


def split_cpu_into_devices(config, environ=None) -> int | None:
  """Gives XLA:CPU the run's CPU device count before jax starts; returns it, or None where it is left alone (the
  user chose a count and the config names none, or jax has already started: effjax used as a library)."""
  import jax  # pylint: disable=import-outside-toplevel
  from effjax import sharding  # pylint: disable=import-outside-toplevel

  count = sharding.cpu_device_count(config, usable_cores())  # validates mesh.cpu_devices in every case
  if not config.mesh.get('cpu_devices', 0) and user_chose_cpu_devices(os.environ if environ is None else environ):
    return None
  try:
    jax.config.update('jax_num_cpu_devices', count)
  except RuntimeError:  # backends already started: the count is fixed
    return None
  return count
