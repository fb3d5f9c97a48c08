"""The settings the CLI makes for itself: transparent huge pages for glibc's malloc (effjax/runtime.py)."""

import os
import subprocess
import sys

import numpy as np
import pytest

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


def _gpt(**overrides):
  from effjax.configs import gpt  # pylint: disable=import-outside-toplevel

  from tests import helpers  # pylint: disable=import-outside-toplevel

  return helpers.set_dotted(gpt.get_config('tiny'), overrides)


def test_cpu_device_count_is_one_per_core_where_the_batch_and_mesh_allow():
  from effjax import sharding  # pylint: disable=import-outside-toplevel
  from effjax.errors import EffjaxError  # pylint: disable=import-outside-toplevel

  count = sharding.cpu_device_count
  assert count(_gpt(**{'train.batch_size': 16}), cores=2) == 2
  assert count(_gpt(**{'train.batch_size': 12}), cores=8) == 6  # 8 and 7 do not divide 12
  assert count(_gpt(**{'train.batch_size': 64}), cores=64) == sharding.CPU_DEVICES_MAX
  assert count(_gpt(**{'train.batch_size': 3}), cores=2) == 1  # an odd batch stays on one device
  assert count(_gpt(**{'train.batch_size': 8, 'train.grad_accum': 4}), cores=4) == 2  # micro-batches of 2
  assert count(_gpt(**{'train.batch_size': 16, 'mesh.data': 1}), cores=2) == 1  # an explicit mesh is kept
  assert count(_gpt(**{'train.batch_size': 16, 'mesh.fsdp': 2}), cores=4) == 4  # data=-1 takes the rest
  assert count(_gpt(**{'train.batch_size': 3, 'mesh.cpu_devices': 3}), cores=2) == 3  # named: taken as it is
  for bad in (-1, -4):
    with pytest.raises(EffjaxError, match=r'mesh.cpu_devices=.* is invalid; use 0 \(one device per core'):
      count(_gpt(**{'mesh.cpu_devices': bad}), cores=2)


def _env_without_a_device_count() -> dict:
  from tests import helpers  # pylint: disable=import-outside-toplevel

  env = {k: v for k, v in os.environ.items() if k != 'JAX_NUM_CPU_DEVICES'}
  return {**env, 'XLA_FLAGS': helpers.xla_flags(None), 'JAX_PLATFORMS': 'cpu'}


def _devices_of_a_fresh_process(env, cpu_devices: int = 0) -> int:
  code = (
    'from effjax import runtime; from effjax.configs import gpt; import jax; c = gpt.get_config("tiny"); '
    f'c.train.batch_size = 16; c.mesh.cpu_devices = {cpu_devices}; runtime.split_cpu_into_devices(c); '
    'print(jax.device_count())'
  )
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
  return int(out.stdout.split()[-1])


def test_split_cpu_into_devices_leaves_a_users_count_alone():
  """A fresh process gets one device per core (as far as 16 rows split), unless XLA_FLAGS or JAX_NUM_CPU_DEVICES
  name a count; mesh.cpu_devices in the config wins over both."""
  from effjax import sharding  # pylint: disable=import-outside-toplevel

  env = _env_without_a_device_count()
  flags = env['XLA_FLAGS']
  assert _devices_of_a_fresh_process(env) == sharding.cpu_device_count(
    _gpt(**{'train.batch_size': 16}), cores=runtime.usable_cores()
  )
  assert _devices_of_a_fresh_process({**env, 'XLA_FLAGS': flags + ' --xla_force_host_platform_device_count=3'}) == 3
  assert _devices_of_a_fresh_process({**env, 'JAX_NUM_CPU_DEVICES': '5'}) == 5
  assert _devices_of_a_fresh_process({**env, 'JAX_NUM_CPU_DEVICES': '5'}, cpu_devices=1) == 1


def test_the_cli_trains_on_one_device_per_core_with_the_losses_of_one_device(tmp_path, corpus_dir):
  """`python -m effjax.main` with no device count set splits the CPU itself, logs it, and trains the same run
  (data-parallel sums in another order: losses equal to float32 rounding) as with mesh.cpu_devices=1."""
  from effjax import sharding  # pylint: disable=import-outside-toplevel

  from tests import helpers  # pylint: disable=import-outside-toplevel

  expected = sharding.cpu_device_count(_gpt(**{'train.batch_size': 8}), cores=runtime.usable_cores())
  losses = {}
  for cpu_devices in (0, 1):
    workdir = tmp_path / f'cpu{cpu_devices}'
    r = helpers.run_cli(
      '--config=gpt:tiny',
      f'--workdir={workdir}',
      '--progress=false',
      f'--config.data.corpus={corpus_dir}',
      '--config.train.steps=6',
      '--config.train.batch_size=8',
      '--config.train.log_every=1',
      f'--config.mesh.cpu_devices={cpu_devices}',
      cwd=str(tmp_path),
      devices=None,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    announced = f'XLA:CPU: {expected} devices, one per core' in r.stderr
    assert announced == (cpu_devices == 0 and expected > 1), r.stderr[-2000:]
    losses[cpu_devices] = helpers.train_losses(workdir)
  assert sorted(losses[0]) == list(range(1, 7))
  np.testing.assert_allclose([losses[0][s] for s in range(1, 7)], [losses[1][s] for s in range(1, 7)], rtol=2e-5)
  assert losses[0][6] < losses[0][1] - 0.1  # it trained
