"""The settings the CLI makes for itself: transparent huge pages for glibc's malloc (effjax/runtime.py)."""

import os
import subprocess
import sys

from effjax import runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_hugepage_environment_rules():
  assert runtime.hugepage_environment({}, 'madvise') == {'GLIBC_TUNABLES': runtime.HUGETLB}
  assert runtime.hugepage_environment({}, 'always') == {'GLIBC_TUNABLES': runtime.HUGETLB}
  kept = runtime.hugepage_environment({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2', 'X': '1'}, 'madvise')
  assert kept == {'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2:' + runtime.HUGETLB, 'X': '1'}
  assert runtime.hugepage_environment({}, 'never') is None  # the kernel offers none
  assert runtime.hugepage_environment({}, None) is None  # no THP setting at all
  assert runtime.hugepage_environment({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}, 'madvise') is None  # user's own
  assert runtime.hugepage_environment({runtime.NO_REEXEC: '1'}, 'madvise') is None


def test_transparent_hugepages_reads_the_kernel_setting(tmp_path):
  (tmp_path / 'enabled').write_text('always [madvise] never\n')
  assert runtime.transparent_hugepages(str(tmp_path / 'enabled')) == 'madvise'
  assert runtime.transparent_hugepages(str(tmp_path / 'absent')) is None


def _child(env):
  code = (
    'import os; from effjax import runtime; runtime.reexec_with_hugepages(); '
    'print(os.getpid(), os.environ.get("GLIBC_TUNABLES", ""))'
  )
  out = subprocess.run(
    [sys.executable, '-c', code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
  ).stdout.split()
  return out[1] if len(out) > 1 else ''


def test_reexec_sets_the_tunable_when_the_kernel_offers_huge_pages():
  """The real exec: the same command line runs again with the tunable (or unchanged where THP is off here)."""
  env = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', runtime.NO_REEXEC)}
  want = runtime.HUGETLB if runtime.transparent_hugepages() in ('always', 'madvise') else ''
  assert _child(env) == want
  assert _child({**env, runtime.NO_REEXEC: '1'}) == ''
