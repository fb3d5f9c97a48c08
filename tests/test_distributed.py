"""effjax.distributed.plan: the jax.distributed.initialize call each platform's environment leads to."""

from __future__ import annotations

import subprocess
import sys

import pytest

from effjax import distributed
from effjax.errors import EffjaxError
from tests.helpers import ROOT

NO_FLAGS = {'coordinator_address': None, 'num_processes': None, 'process_id': None}
NO_TPU = {'EFFJAX_LIBTPU': '0'}

# What each platform sets (names and value formats as the schedulers/runtimes write them).
SLURM = {
  'SLURM_JOB_ID': '4242',
  'SLURM_NTASKS': '8',
  'SLURM_STEP_NUM_TASKS': '8',
  'SLURM_PROCID': '5',
  'SLURM_LOCALID': '1',
  'SLURM_STEP_NODELIST': 'gpu[017-020]',
  'SLURM_JOB_NODELIST': 'gpu[017-020]',
}
OPENMPI = {
  'OMPI_COMM_WORLD_SIZE': '4',
  'OMPI_COMM_WORLD_RANK': '3',
  'OMPI_COMM_WORLD_LOCAL_RANK': '1',
  'OMPI_MCA_orte_hnp_uri': '1531576320.0;tcp://10.96.0.1,10.148.0.1:34911',
}
GKE_TPU = {'EFFJAX_LIBTPU': '1', 'TPU_WORKER_ID': '2', 'TPU_WORKER_HOSTNAMES': 'w-0,w-1,w-2,w-3'}


def no_metadata(key):
  raise AssertionError(f'metadata server asked for {key}')


def tpu_vm_metadata(endpoints):
  def fetch(key):
    assert key == 'worker-network-endpoints'
    return endpoints

  return fetch


@pytest.mark.parametrize(
  'env, metadata, platform, kwargs',
  [
    ({}, no_metadata, 'none', {}),  # a laptop / one CPU process (no libtpu installed here)
    (NO_TPU, no_metadata, 'none', {}),
    ({**SLURM, 'SLURM_NTASKS': '1', 'SLURM_STEP_NUM_TASKS': '1', **NO_TPU}, no_metadata, 'none', {}),  # 1-task job
    ({'OMPI_COMM_WORLD_SIZE': '1', 'OMPI_COMM_WORLD_RANK': '0', **NO_TPU}, no_metadata, 'none', {}),
    (
      {**SLURM, **NO_TPU},
      no_metadata,
      'slurm',
      {'coordinator_address': 'gpu017:24242', 'num_processes': 8, 'process_id': 5},
    ),
    (
      {**OPENMPI, **NO_TPU},
      no_metadata,
      'openmpi',
      {'coordinator_address': '10.96.0.1:62624', 'num_processes': 4, 'process_id': 3},
    ),
    # Cloud TPU VM of a v4-32 slice: 4 workers in the metadata -> initialize() with no arguments.
    ({'EFFJAX_LIBTPU': '1'}, tpu_vm_metadata('t1k-0,t1k-1,t1k-2,t1k-3'), 'tpu', {}),
    ({'EFFJAX_LIBTPU': '1'}, tpu_vm_metadata('t1k-0'), 'none', {}),  # v4-8: one host
    ({'EFFJAX_LIBTPU': '1'}, lambda key: None, 'none', {}),  # libtpu but no metadata server: one host
    (GKE_TPU, no_metadata, 'tpu', {}),
    ({'EFFJAX_LIBTPU': '1', 'TPU_WORKER_HOSTNAMES': 'w-0', 'MEGASCALE_NUM_SLICES': '2'}, no_metadata, 'tpu', {}),
  ],
)
def test_plan_per_platform(env, metadata, platform, kwargs):
  chosen = distributed.plan(NO_FLAGS, env, metadata)
  assert (chosen.platform, chosen.kwargs) == (platform, kwargs)
  assert chosen.initialize == (platform != 'none')


@pytest.mark.parametrize('env', [SLURM, OPENMPI, GKE_TPU])
def test_explicit_flags_win(env):
  flags = {'coordinator_address': 'head:1234', 'num_processes': 2, 'process_id': 1}
  chosen = distributed.plan(flags, env, no_metadata)
  assert (chosen.platform, chosen.kwargs) == ('explicit', flags)
  from_env = distributed.plan(
    NO_FLAGS,
    {**env, 'EFFJAX_COORDINATOR_ADDRESS': 'head:1234', 'EFFJAX_NUM_PROCESSES': '2', 'EFFJAX_PROCESS_ID': '1'},
    no_metadata,
  )
  assert from_env == chosen
  assert distributed.plan({**flags, 'num_processes': 1, 'process_id': 0}, env, no_metadata).platform == 'none'


@pytest.mark.parametrize(
  'flags, env, message',
  [
    ({'num_processes': 4}, NO_TPU, '--num_processes=4 needs --coordinator_address'),
    ({}, {**NO_TPU, 'EFFJAX_NUM_PROCESSES': 'four'}, "EFFJAX_NUM_PROCESSES='four' is not an integer"),
    ({}, {**NO_TPU, 'OMPI_COMM_WORLD_SIZE': '4', 'OMPI_COMM_WORLD_RANK': '0'}, 'OMPI_MCA_orte_hnp_uri is not set'),
  ],
)
def test_bad_environment_is_one_line(flags, env, message):
  with pytest.raises(EffjaxError, match=message):
    distributed.plan({**NO_FLAGS, **flags}, env, no_metadata)


@pytest.mark.parametrize(
  'nodelist, host',
  [('node001', 'node001'), ('node001,host2', 'node001'), ('node[001-015],host2', 'node001'), ('gpu[3,7-9]', 'gpu3')],
)
def test_first_slurm_host(nodelist, host):
  assert distributed.first_slurm_host(nodelist) == host


def test_module_prints_the_decision():
  env = {'PATH': '/usr/bin:/bin', **SLURM, **NO_TPU}
  r = subprocess.run(
    [sys.executable, '-m', 'effjax.distributed'], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60
  )
  assert r.returncode == 0, r.stderr
  assert r.stdout.strip() == (
    "slurm: jax.distributed.initialize(coordinator_address='gpu017:24242', num_processes=8, process_id=5)"
  )
