"""Process settings a run makes for itself before jax starts, so that users need not export them by hand.

Huge pages: XLA:CPU allocates and frees large activation buffers every step; with 4 KiB pages a 6-layer/384-wide
training step takes ~123k page faults, with transparent huge pages ~300 (experiments/bench.py records both).
glibc's malloc asks for huge pages only when GLIBC_TUNABLES says `glibc.malloc.hugetlb=1`, and glibc reads that
once at process start, so the CLI re-executes itself with it (same pid, same arguments) when the kernel offers
transparent huge pages and the variable is not already set. EFFJAX_NO_REEXEC=1 turns this off.
"""

from __future__ import annotations

import os
import re
import sys

HUGETLB = 'glibc.malloc.hugetlb=1'
NO_REEXEC = 'EFFJAX_NO_REEXEC'
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
