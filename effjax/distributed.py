"""Multi-host start-up: which `jax.distributed.initialize` call this process needs, decided from the flags and
the environment each platform sets, before any backend is touched.

  explicit  --coordinator_address / --num_processes / --process_id (or EFFJAX_COORDINATOR_ADDRESS, ...): win.
  tpu       a multi-host Cloud TPU slice (libtpu installed; more than one worker in TPU_WORKER_HOSTNAMES /
            TPU_PROCESS_ADDRESSES, MEGASCALE_NUM_SLICES > 1, or the VM metadata's worker-network-endpoints):
            initialize() with no arguments, as JAX's docs say; JAX finds the slice itself.
  slurm     SLURM_NTASKS > 1 (inside srun): coordinator = first host of the step, ids from SLURM_PROCID.
  openmpi   OMPI_COMM_WORLD_SIZE > 1 (mpirun): coordinator = the launcher's address from OMPI_MCA_orte_hnp_uri.
  none      one process: jax.distributed stays uninitialised.

`python -m effjax.distributed` prints the decision for the current environment (the launchers' dry runs show it).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import sys
from typing import Callable, Mapping

from effjax.errors import EffjaxError

METADATA_URL = 'http://metadata.google.internal/computeMetadata/v1/instance/attributes/'


@dataclasses.dataclass(frozen=True)
class Plan:
  platform: str  # explicit | tpu | slurm | openmpi | none
  kwargs: dict  # for jax.distributed.initialize; {} = no arguments (auto-detect)

  @property
  def initialize(self) -> bool:
    return self.platform != 'none'

  def describe(self) -> str:
    if not self.initialize:
      return 'single process: jax.distributed not initialised'
    args = ', '.join(f'{k}={v!r}' for k, v in self.kwargs.items())
    return f'{self.platform}: jax.distributed.initialize({args})'


def _int(env: Mapping[str, str], name: str) -> int | None:
  value = env.get(name)
  if value in (None, ''):
    return None
  try:
    return int(value)
  except ValueError:
    raise EffjaxError(f'{name}={value!r} is not an integer') from None


def first_slurm_host(nodelist: str) -> str:
  """The first host of a SLURM node list: 'node001', 'a,b', 'node[001-015],x', 'gpu[3,7-9]' -> node001 / gpu3."""
  match = re.match(r'^([^,\[]+)(?:\[([^,\-\]]+))?', nodelist)
  if not match:
    raise EffjaxError(f'SLURM node list {nodelist!r} is not understood')
  return match.group(1) + (match.group(2) or '')


def _slurm_port(job_id: int) -> int:
  return 20000 + job_id % 20000  # the port gpu_slurm.sh derives from the job id, in the same way


def _ompi_coordinator(uri: str) -> str:
  """Coordinator HOST:PORT from OMPI_MCA_orte_hnp_uri ('JOBID.0;tcp://IP,IP:PORT'), as JAX's OmpiCluster does."""
  match = re.search(r'tcp://(.+?)[,:]|tcp6://\[(.+?)[,\]]', uri)
  if not match:
    raise EffjaxError(f'OMPI_MCA_orte_hnp_uri={uri!r} holds no tcp:// address of the launcher')
  job_id = int(uri.split('.', 1)[0]) // 2**12
  return f'{match.group(1) or match.group(2)}:{job_id % 2**12 + 65535 - 2**12 + 1}'


def _tpu_metadata(key: str) -> str | None:
  """A Cloud TPU VM's metadata attribute (None when there is no metadata server: not a Cloud VM)."""
  import urllib.request  # pylint: disable=import-outside-toplevel

  try:
    request = urllib.request.Request(METADATA_URL + key, headers={'Metadata-Flavor': 'Google'})
    with urllib.request.urlopen(request, timeout=5) as response:
      return response.read().decode()
  except OSError:
    return None


def tpu_hosts(env: Mapping[str, str], metadata: Callable[[str], str | None]) -> int:
  """Hosts of the TPU job (all slices); 0 when this is no Cloud TPU host (libtpu absent)."""
  if 'EFFJAX_LIBTPU' in env:  # tests and dry runs state it; real hosts are seen by their libtpu
    has_libtpu = env['EFFJAX_LIBTPU'] == '1'
  else:
    has_libtpu = importlib.util.find_spec('libtpu') is not None
  if not has_libtpu:
    return 0
  slices = _int(env, 'MEGASCALE_NUM_SLICES') or 1
  workers = env.get('TPU_PROCESS_ADDRESSES') or env.get('TPU_WORKER_HOSTNAMES')  # GKE sets these
  if workers is None and not env.get('TPU_SKIP_MDS_QUERY'):
    workers = metadata('worker-network-endpoints')  # a TPU VM (gcloud compute tpus tpu-vm create)
  return slices * (len(workers.split(',')) if workers else 1)


def plan(
  flags: Mapping[str, object],
  env: Mapping[str, str] | None = None,
  metadata: Callable[[str], str | None] = _tpu_metadata,
) -> Plan:
  """The initialisation this process needs. `flags`: coordinator_address, num_processes, process_id (None =
  not given)."""
  env = os.environ if env is None else env
  address = flags.get('coordinator_address') or env.get('EFFJAX_COORDINATOR_ADDRESS') or None
  num = flags.get('num_processes') or _int(env, 'EFFJAX_NUM_PROCESSES')
  pid = flags.get('process_id')
  pid = _int(env, 'EFFJAX_PROCESS_ID') if pid is None else pid
  if address or num or pid is not None:
    if num is not None and num > 1 and (address is None or pid is None) and not _cluster_named(env):
      raise EffjaxError(
        f'--num_processes={num} needs --coordinator_address=HOST:PORT and --process_id too '
        '(or run under SLURM / Open MPI / a Cloud TPU slice, which set them)'
      )
    if num == 1:
      return Plan('none', {})
    return Plan(
      'explicit',
      {
        k: v
        for k, v in (('coordinator_address', address), ('num_processes', num), ('process_id', pid))
        if v is not None
      },
    )
  slurm_tasks = _int(env, 'SLURM_STEP_NUM_TASKS') or _int(env, 'SLURM_NTASKS')
  if 'SLURM_JOB_ID' in env and 'SLURM_PROCID' in env and (slurm_tasks or 1) > 1:
    nodes = env.get('SLURM_STEP_NODELIST') or env.get('SLURM_JOB_NODELIST')
    if not nodes:
      raise EffjaxError('SLURM_NTASKS > 1 but neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST is set')
    return Plan(
      'slurm',
      {
        'coordinator_address': f'{first_slurm_host(nodes)}:{_slurm_port(_int(env, "SLURM_JOB_ID"))}',
        'num_processes': slurm_tasks,
        'process_id': _int(env, 'SLURM_PROCID'),
      },
    )
  ompi_size = _int(env, 'OMPI_COMM_WORLD_SIZE')
  if ompi_size and ompi_size > 1:
    uri = env.get('OMPI_MCA_orte_hnp_uri')
    if not uri:
      raise EffjaxError(
        'OMPI_COMM_WORLD_SIZE > 1 but OMPI_MCA_orte_hnp_uri is not set (Open MPI 5 / PRRTE: '
        'pass --coordinator_address, --num_processes and --process_id)'
      )
    return Plan(
      'openmpi',
      {
        'coordinator_address': _ompi_coordinator(uri),
        'num_processes': ompi_size,
        'process_id': _int(env, 'OMPI_COMM_WORLD_RANK'),
      },
    )
  if tpu_hosts(env, metadata) > 1:
    return Plan('tpu', {})
  return Plan('none', {})


def _cluster_named(env: Mapping[str, str]) -> bool:
  return 'SLURM_JOB_ID' in env or 'OMPI_MCA_orte_hnp_uri' in env or 'TPU_WORKER_HOSTNAMES' in env


def initialize(flags: Mapping[str, object]) -> Plan:
  """Calls jax.distributed.initialize as planned (once; a second call is a no-op)."""
  chosen = plan(flags)
  if chosen.initialize:
    import jax  # pylint: disable=import-outside-toplevel
    from absl import logging  # pylint: disable=import-outside-toplevel

    logging.info('multi-host start-up: %s', chosen.describe())
    jax.distributed.initialize(**chosen.kwargs)
  return chosen


if __name__ == '__main__':
  print(plan({}).describe())
  sys.exit(0)
