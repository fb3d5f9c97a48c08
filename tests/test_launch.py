"""Launch scripts: dry-run output of launch/tpu_vm.sh and launch/gpu_slurm.sh, and launch/local.py.

Nothing here needs gcloud, sbatch or jax: the shell scripts only run in --dry-run mode (a fake `gcloud`/`sbatch`
first on PATH proves they are never executed), and launch.local is exercised with a stand-in for effjax.main.
"""

from __future__ import annotations

import os
import shlex
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TPU = REPO / 'launch' / 'tpu_vm.sh'
SLURM = REPO / 'launch' / 'gpu_slurm.sh'
if str(REPO) not in sys.path:  # `launch` is a top-level package of the checkout, not installed
  sys.path.insert(0, str(REPO))

BASE = [
  '--name',
  't',
  '--zone',
  'us-central2-b',
  '--accelerator',
  'v4-32',
  '--workdir',
  'gs://b/r',
  '--config',
  'configs/gpt.py:small',
]
PASS = ['--', '--config.train.steps=10']
MAIN = (
  'python -m effjax.main --config=configs/gpt.py:small --workdir=gs://b/r --config.train.require_backend=tpu '
  '--config.train.steps=10'
)


def _write_exe(path: Path, text: str) -> None:
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


@pytest.fixture
def fake_path(tmp_path):
  """A PATH whose gcloud / sbatch / srun only leave a marker file: dry runs must never call them."""
  bin_dir = tmp_path / 'fakebin'
  bin_dir.mkdir()
  marker = tmp_path / 'EXECUTED'
  for tool in ('gcloud', 'sbatch', 'srun'):
    _write_exe(bin_dir / tool, f'#!/bin/sh\necho {tool} "$@" >> {marker}\n')
  yield f'{bin_dir}{os.pathsep}{os.environ.get("PATH", "")}', marker
  assert not marker.exists(), f'a dry run executed: {marker.read_text()}'


def _bash(script: Path, args, path_env: str, cwd: Path) -> subprocess.CompletedProcess:
  env = {**os.environ, 'PATH': path_env}
  return subprocess.run(['bash', str(script), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=30)


def _commands(stdout: str) -> list[list[str]]:
  """The '+ '-prefixed command lines, split like a shell would (pipes kept as '|' tokens)."""
  return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith('+ ')]


def _gcloud(cmds, *words):
  return [c for c in cmds if c[: len(words) + 1] == ['gcloud', *words]]


def _opt(cmd, name):
  vals = [a.split('=', 1)[1] for a in cmd if a.startswith(name + '=')]
  assert len(vals) == 1, (name, cmd)
  return vals[0]


# ------------------------------------------------------------------------------------------------ tpu_vm.sh
def test_tpu_dry_run_direct(fake_path, tmp_path):
  path_env, _ = fake_path
  r = _bash(TPU, ['--dry-run', *BASE, *PASS], path_env, tmp_path)
  assert r.returncode == 0, r.stderr
  cmds = _commands(r.stdout)

  creates = _gcloud(cmds, 'compute', 'tpus', 'tpu-vm', 'create')
  assert creates == [
    [
      'gcloud',
      'compute',
      'tpus',
      'tpu-vm',
      'create',
      't',
      '--zone=us-central2-b',
      '--accelerator-type=v4-32',
      '--version=tpu-ubuntu2204-base',
    ]
  ]
  assert not _gcloud(cmds, 'compute', 'tpus', 'queued-resources')

  # the default repo is this checkout: staged, then copied to every worker
  scps = _gcloud(cmds, 'compute', 'tpus', 'tpu-vm', 'scp')
  assert len(scps) == 1 and '--recurse' in scps[0] and '--worker=all' in scps[0]
  assert scps[0][-1] == 't:~/' and '--zone=us-central2-b' in scps[0]

  sshs = _gcloud(cmds, 'compute', 'tpus', 'tpu-vm', 'ssh')
  assert sshs and all('--worker=all' in c and 't' in c and '--zone=us-central2-b' in c for c in sshs)
  remote = [_opt(c, '--command') for c in sshs]
  install = [s for s in remote if 'pip install' in s]
  assert len(install) == 1
  # uv brings a Python 3.11 to workers whose image ships 3.10, then installs jax[tpu] at our pin and gs://
  steps = [step.strip() for step in install[0].split(';')]
  for step in (
    'command -v uv >/dev/null || python3 -m pip install -q --user uv',
    'uv venv -q --python 3.11 .venv',
    '. .venv/bin/activate',
    "uv pip install -q -e '.[tpu,gcs]'",
    'python -m effjax.distributed',
  ):
    assert step in steps, (step, steps)
  assert steps.index('uv venv -q --python 3.11 .venv') < steps.index("uv pip install -q -e '.[tpu,gcs]'")
  # the multi-host decision effjax takes on each of the 4 workers of a v4-32, shown before anything runs
  assert r.stdout.splitlines()[0] == (
    '# v4-32: 16 chip(s) on 4 host(s); multi-host start-up on each worker: tpu: jax.distributed.initialize()'
  )
  train = sshs[-1]
  assert remote[-1].endswith(MAIN), remote[-1]
  assert '. .venv/bin/activate' in remote[-1]
  assert train[-5:-1] == ['2>&1', '|', 'tee', '-a'] and train[-1].endswith('.log')  # logs streamed and kept locally
  # order: create → copy → install → train; and nothing is deleted without --teardown
  order = [cmds.index(creates[0]), cmds.index(scps[0]), cmds.index(sshs[-2]), cmds.index(train)]
  assert order == sorted(order)
  assert not [c for c in cmds if 'delete' in c]
  assert cmds[-1] == train


def test_tpu_dry_run_teardown_and_project(fake_path, tmp_path):
  path_env, _ = fake_path
  r = _bash(TPU, ['--dry-run', *BASE, '--teardown', '--project', 'proj', '--spot', *PASS], path_env, tmp_path)
  assert r.returncode == 0, r.stderr
  cmds = _commands(r.stdout)
  assert cmds[-1] == [
    'gcloud',
    'compute',
    'tpus',
    'tpu-vm',
    'delete',
    't',
    '--zone=us-central2-b',
    '--project=proj',
    '--quiet',
  ]
  assert all('--project=proj' in c for c in cmds if c[0] == 'gcloud')
  create = _gcloud(cmds, 'compute', 'tpus', 'tpu-vm', 'create')[0]
  assert '--spot' in create
  assert _opt(_gcloud(cmds, 'compute', 'tpus', 'tpu-vm', 'ssh')[-1], '--command').endswith(MAIN)


def test_tpu_dry_run_queued_git_repo(fake_path, tmp_path):
  path_env, _ = fake_path
  args = [
    '--dry-run',
    *BASE,
    '--queued',
    '--spot',
    '--teardown',
    '--repo',
    'https://github.com/x/effjax.git',
    '--branch',
    'dev',
    '--version',
    'v2-alpha-tpuv4',
    *PASS,
    '--config.mesh.fsdp=4',
  ]
  r = _bash(TPU, args, path_env, tmp_path)
  assert r.returncode == 0, r.stderr
  cmds = _commands(r.stdout)
  assert not _gcloud(cmds, 'compute', 'tpus', 'tpu-vm', 'create')
  (create,) = _gcloud(cmds, 'compute', 'tpus', 'queued-resources', 'create')
  assert create[:6] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'create', 't']
  for flag in (
    '--zone=us-central2-b',
    '--node-id=t',
    '--accelerator-type=v4-32',
    '--runtime-version=v2-alpha-tpuv4',
    '--spot',
  ):
    assert flag in create, flag
  (describe,) = _gcloud(cmds, 'compute', 'tpus', 'queued-resources', 'describe')
  assert _opt(describe, '--format') == 'value(state.state)'
  assert 'ACTIVE' in r.stdout
  # a git URL is cloned on every worker instead of copied
  assert not _gcloud(cmds, 'compute', 'tpus', 'tpu-vm', 'scp')
  remote = [_opt(c, '--command') for c in _gcloud(cmds, 'compute', 'tpus', 'tpu-vm', 'ssh')]
  assert any('git clone --depth=1 --branch dev https://github.com/x/effjax.git' in s for s in remote)
  assert remote[-1].endswith(MAIN + ' --config.mesh.fsdp=4')
  assert cmds[-1] == [
    'gcloud',
    'compute',
    'tpus',
    'queued-resources',
    'delete',
    't',
    '--zone=us-central2-b',
    '--force',
    '--quiet',
  ]


def test_tpu_passthrough_args_are_quoted(fake_path, tmp_path):
  path_env, _ = fake_path
  r = _bash(TPU, ['--dry-run', *BASE, '--', '--mode=sample', "--prompt=it's a test"], path_env, tmp_path)
  assert r.returncode == 0, r.stderr
  remote = _opt(_gcloud(_commands(r.stdout), 'compute', 'tpus', 'tpu-vm', 'ssh')[-1], '--command')
  main = remote.split(' && ')[-1]
  assert shlex.split(main) == [
    'python',
    '-m',
    'effjax.main',
    '--config=configs/gpt.py:small',
    '--workdir=gs://b/r',
    '--config.train.require_backend=tpu',
    '--mode=sample',
    "--prompt=it's a test",
  ]


def test_tpu_runtime_version_follows_generation(fake_path, tmp_path):
  path_env, _ = fake_path
  args = ['--dry-run', '--name', 't', '--accelerator=v5litepod-16', '--workdir=gs://b/r', '--config=c.py']
  r = _bash(TPU, args, path_env, tmp_path)
  assert r.returncode == 0, r.stderr
  create = _gcloud(_commands(r.stdout), 'compute', 'tpus', 'tpu-vm', 'create')[0]
  assert '--accelerator-type=v5litepod-16' in create and '--version=v2-alpha-tpuv5-lite' in create
  assert '16 chip(s) on 4 host(s)' in r.stdout.splitlines()[0]


@pytest.mark.parametrize(
  'accelerator, hosts, decision',
  [
    ('v4-8', 1, 'single process: jax.distributed not initialised'),
    ('v5litepod-8', 1, 'single process: jax.distributed not initialised'),
    ('v4-128', 16, 'tpu: jax.distributed.initialize()'),
    ('v6e-16', 4, 'tpu: jax.distributed.initialize()'),
  ],
)
def test_tpu_dry_run_shows_the_multi_host_decision(fake_path, tmp_path, accelerator, hosts, decision):
  path_env, _ = fake_path
  args = ['--dry-run', '--name', 't', f'--accelerator={accelerator}', '--workdir=gs://b/r', '--config=c.py']
  r = _bash(TPU, args, path_env, tmp_path)
  assert r.returncode == 0, r.stderr
  first = r.stdout.splitlines()[0]
  assert f'on {hosts} host(s)' in first and first.endswith(f'multi-host start-up on each worker: {decision}')


@pytest.mark.parametrize(
  'args, message',
  [
    (
      ['--name', 't', '--accelerator', 'v4_32', '--workdir', 'gs://b/r', '--config', 'c.py'],
      "bad --accelerator 'v4_32'",
    ),
    (['--name', 't', '--accelerator', 'tpu-32', '--workdir', 'gs://b/r', '--config', 'c.py'], 'bad --accelerator'),
    (['--name', 't', '--accelerator', 'v4-', '--workdir', 'gs://b/r', '--config', 'c.py'], 'bad --accelerator'),
    (['--accelerator', 'v4-8', '--workdir', 'gs://b/r', '--config', 'c.py'], 'missing --name'),
    (['--name', 't', '--accelerator', 'v4-8', '--workdir', 'gs://b/r'], 'missing --config'),
    (['--name', 't', '--accelerator', 'v4-8', '--config', 'c.py'], 'missing --workdir'),
    (['--name', 't', '--workdir', 'gs://b/r', '--config', 'c.py'], 'missing --accelerator'),
    ([*BASE, '--frobnicate'], "unknown option '--frobnicate'"),
    ([*BASE, '--zone'], 'option --zone needs a value'),
  ],
)
def test_tpu_usage_errors(fake_path, tmp_path, args, message):
  path_env, _ = fake_path
  r = _bash(TPU, ['--dry-run', *args], path_env, tmp_path)
  assert r.returncode == 2
  assert r.stdout == ''
  lines = r.stderr.splitlines()
  assert len(lines) == 1 and lines[0].startswith('tpu_vm.sh: error: ') and message in lines[0], r.stderr


# ------------------------------------------------------------------------------------------------ gpu_slurm.sh
SLURM_ARGS = [
  '--nodes',
  '4',
  '--partition',
  'gpu',
  '--time',
  '12:00:00',
  '--job-name',
  'gpt',
  '--workdir',
  '/shared/runs/x',
  '--config',
  'configs/gpt.py:small',
]


def _sbatch_body(stdout: str) -> str:
  lines = stdout.splitlines()
  start = lines.index('# ---- gpt.sbatch') + 1
  end = lines.index('# ----', start)
  return '\n'.join(lines[start:end]) + '\n'


def test_slurm_dry_run_per_node(fake_path, tmp_path):
  path_env, _ = fake_path
  r = _bash(SLURM, ['--dry-run', *SLURM_ARGS, *PASS], path_env, tmp_path)
  assert r.returncode == 0, r.stderr
  out = r.stdout
  for line in (
    '#SBATCH --nodes=4',
    '#SBATCH --gpus-per-node=8',
    '#SBATCH --ntasks-per-node=1',
    '#SBATCH --partition=gpu',
    '#SBATCH --time=12:00:00',
    '#SBATCH --job-name=gpt',
  ):
    assert line in out.splitlines(), line
  assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)' in out
  assert 'EFFJAX_COORDINATOR_ADDRESS=' in out and 'SLURM_JOB_ID' in out
  assert 'srun ' in out
  assert '--num_processes="$SLURM_NTASKS"' in out and '--process_id="$SLURM_PROCID"' in out
  assert '--xla_gpu_enable_latency_hiding_scheduler=true' in out and 'NCCL_DEBUG' in out
  assert (
    '--config=configs/gpt.py:small --workdir=/shared/runs/x --config.train.require_backend=gpu --config.train.steps=10'
  ) in out
  assert out.splitlines()[0] == (
    '# 4 node(s) x 8 GPU(s), 4 process(es); multi-host start-up in task 0: explicit: '
    "jax.distributed.initialize(coordinator_address='FIRST_HOST:PORT', "
    'num_processes=4, process_id=0)'
  )
  # the CUDA build is checked (not installed without --install) before anything runs
  assert """python -c 'import importlib.metadata as m; m.version("jax-cuda12-plugin")'""" in out
  assert 'pip install' not in out.split('effjax: error: jax-cuda12-plugin')[0]
  assert out.splitlines()[-1] == '+ sbatch gpt.sbatch'
  assert not (tmp_path / 'gpt.sbatch').exists()
  body = _sbatch_body(out)
  assert body.startswith('#!/bin/bash\n')
  assert subprocess.run(['bash', '-n'], input=body, text=True).returncode == 0


def test_slurm_script_runs_with_fake_slurm(fake_path, tmp_path):
  """Execute the generated script with stand-ins for scontrol/srun/python: every task gets the same coordinator
  (first host, port from the job id), --num_processes=SLURM_NTASKS, its own --process_id and, per GPU, its GPU."""
  path_env, _ = fake_path
  venv = tmp_path / 'venv'
  (venv / 'bin').mkdir(parents=True)
  fake = tmp_path / 'slurmbin'
  fake.mkdir()
  _write_exe(fake / 'scontrol', "#!/bin/bash\nprintf 'node-a\\nnode-b\\n'\n")
  _write_exe(
    fake / 'srun',
    '#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\n'
    'for ((i=0;i<SLURM_NTASKS;i++)); do SLURM_PROCID=$i SLURM_LOCALID=$((i%2)) "$@" || exit $?; done\n',
  )
  _write_exe(fake / 'python', '#!/bin/bash\necho "$* CVD=$CUDA_VISIBLE_DEVICES"\n')
  (venv / 'bin' / 'activate').write_text(f'export PATH={fake}:$PATH\n')
  r = _bash(
    SLURM,
    [
      '--dry-run',
      *SLURM_ARGS,
      '--nodes',
      '2',
      '--gpus-per-node',
      '2',
      '--per-gpu',
      '--venv',
      str(venv),
      '--',
      '--config.x=a b',
    ],
    path_env,
    tmp_path,
  )
  assert r.returncode == 0, r.stderr
  body = _sbatch_body(r.stdout)
  assert '#SBATCH --ntasks-per-node=2' in body and 'CUDA_VISIBLE_DEVICES' in body
  env = {
    **os.environ,
    'PATH': path_env,
    'SLURM_JOB_NODELIST': 'node-[a-b]',
    'SLURM_JOB_ID': '7',
    'SLURM_NTASKS': '4',
    'SLURM_JOB_NUM_NODES': '2',
  }
  run = subprocess.run(['bash', '-s'], input=body, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=30)
  assert run.returncode == 0, run.stderr
  lines = [line for line in run.stdout.splitlines() if line.startswith('-m effjax.main')]
  assert len(lines) == 4
  for i, line in enumerate(lines):
    assert line == (
      f'-m effjax.main --config=configs/gpt.py:small --workdir=/shared/runs/x '
      f'--config.train.require_backend=gpu --config.x=a b '
      f'--coordinator_address=node-a:20007 --num_processes=4 --process_id={i} CVD={i % 2}'
    )


def test_slurm_install_and_missing_cuda_plugin(fake_path, tmp_path):
  """--install puts `pip install -e '.[cuda]'` (or cuda13) before the check; the check itself, run with a python
  that lacks the plugin, stops the job with one line and exit code 2 before srun."""
  path_env, _ = fake_path
  r = _bash(SLURM, ['--dry-run', *SLURM_ARGS, '--install', '--cuda', '13'], path_env, tmp_path)
  assert r.returncode == 0, r.stderr
  body = _sbatch_body(r.stdout)
  lines = body.splitlines()
  install = lines.index("pip install -q -e '.[cuda13]'")
  assert install < next(i for i, line in enumerate(lines) if 'jax-cuda13-plugin' in line)
  check = body[body.index('if ! python -c') : body.index('fi\n', body.index('if ! python -c')) + 3]
  bare = tmp_path / 'bare'  # a Python environment with no packages at all, surely no CUDA plugin
  subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(bare)], check=True, timeout=120)
  run = subprocess.run(
    ['bash', '-c', check],
    capture_output=True,
    text=True,
    timeout=60,
    env={**os.environ, 'PATH': f'{bare / "bin"}{os.pathsep}{os.environ["PATH"]}'},
  )
  assert run.returncode == 2
  assert run.stderr.strip().splitlines() == [
    f'effjax: error: jax-cuda13-plugin is not installed for {bare / "bin" / "python"}: '
    "pip install -e '.[cuda13]' (or gpu_slurm.sh --install)"
  ]


def test_slurm_writes_script_without_submitting(fake_path, tmp_path):
  path_env, _ = fake_path
  out = tmp_path / 'job.sbatch'
  r = _bash(SLURM, [*SLURM_ARGS, '--output', str(out), '--no-submit', '--port', '23456'], path_env, tmp_path)
  assert r.returncode == 0, r.stderr
  text = out.read_text()
  assert '#SBATCH --nodes=4' in text and 'COORDINATOR_PORT=23456' in text


@pytest.mark.parametrize(
  'args, message',
  [
    (['--workdir', '/w'], 'missing --config'),
    (['--config', 'c.py'], 'missing --workdir'),
    (['--workdir', '/w', '--config', 'c.py', '--nodes', '0'], "bad --nodes '0'"),
    (['--workdir', '/w', '--config', 'c.py', '--gpus'], "unknown option '--gpus'"),
    (['--workdir', '/w', '--config', 'c.py', '--cuda', '11'], "bad --cuda '11'"),
  ],
)
def test_slurm_usage_errors(fake_path, tmp_path, args, message):
  path_env, _ = fake_path
  r = _bash(SLURM, ['--dry-run', *args], path_env, tmp_path)
  assert r.returncode == 2 and r.stdout == ''
  lines = r.stderr.splitlines()
  assert len(lines) == 1 and message in lines[0], r.stderr


# ------------------------------------------------------------------------------------------------ launch.local
def test_local_dry_run_cli():
  r = subprocess.run(
    [
      sys.executable,
      '-m',
      'launch.local',
      '--dry-run',
      '--num_processes=3',
      '--devices_per_process=4',
      '--',
      '--config=configs/gpt.py:tiny',
      '--workdir=/tmp/w',
    ],
    capture_output=True,
    text=True,
    cwd=REPO,
    timeout=30,
  )
  assert r.returncode == 0, r.stderr
  lines = [line for line in r.stdout.splitlines() if line.startswith('+ ')]
  assert len(lines) == 3
  ids, coords = [], set()
  for line in lines:
    words = shlex.split(line[2:])
    env = dict(w.split('=', 1) for w in words[:2])
    assert env['XLA_FLAGS'].split()[0] == '--xla_force_host_platform_device_count=4'
    assert env['JAX_PLATFORMS'] == 'cpu'
    assert words[3:7] == ['-m', 'effjax.main', '--config=configs/gpt.py:tiny', '--workdir=/tmp/w']
    assert '--num_processes=3' in words
    ids += [w for w in words if w.startswith('--process_id=')]
    coords |= {w for w in words if w.startswith('--coordinator_address=localhost:')}
  assert ids == ['--process_id=0', '--process_id=1', '--process_id=2']
  assert len(coords) == 1  # one coordinator, a free port picked for it


def test_local_cli_requires_separator():
  r = subprocess.run(
    [sys.executable, '-m', 'launch.local', '--dry-run', '--config=x'],
    capture_output=True,
    text=True,
    cwd=REPO,
    timeout=30,
  )
  assert r.returncode == 2 and 'after `--`' in r.stderr


# A stand-in for effjax.main: reports what it was given, then sleeps / fails as asked.
FAKE_MAIN = """
import os, sys, time
args = sys.argv[1:]
pid = int(next(a for a in args if a.startswith("--process_id=")).split("=")[1])
print("args", " ".join(args), flush=True)
print("env", os.environ["XLA_FLAGS"], os.environ["JAX_PLATFORMS"], file=sys.stderr, flush=True)
if "--fail1" in args and pid == 1:
    sys.exit(3)
if "--sleep" in args:
    time.sleep(60)
"""


@pytest.fixture
def fake_main(tmp_path):
  (tmp_path / 'fakemain.py').write_text(FAKE_MAIN)
  return dict(
    env={'PYTHONPATH': str(tmp_path), 'XLA_FLAGS': '--xla_force_host_platform_device_count=8 --foo'},
    module='fakemain',
    sink=None,
  )


def test_launch_local_success(fake_main):
  from launch.local import launch_local

  results = launch_local(
    ['--config=configs/gpt.py:tiny'], num_processes=2, devices_per_process=3, port=12345, timeout=30, **fake_main
  )
  assert [r.returncode for r in results] == [0, 0]
  for i, r in enumerate(results):
    assert (
      f'args --config=configs/gpt.py:tiny --coordinator_address=localhost:12345 --num_processes=2 --process_id={i}'
    ) in r.stdout
    # the device count replaces any inherited one; other XLA flags are kept
    assert 'env --xla_force_host_platform_device_count=3 --foo cpu' in r.stdout


def test_launch_local_failure_terminates_others(fake_main):
  from launch.local import launch_local

  t0 = time.monotonic()
  results = launch_local(['--sleep', '--fail1'], 3, 1, timeout=30, **fake_main)
  assert time.monotonic() - t0 < 20
  codes = [r.returncode for r in results]
  assert codes[1] == 3 and codes[0] != 0 and codes[2] != 0


def test_start_kill_restart(fake_main):
  from launch.local import kill_all, start_local, wait_all

  procs = start_local(['--sleep'], 2, 2, **fake_main)
  deadline = time.monotonic() + 20
  while not all(p.lines for p in procs) and time.monotonic() < deadline:
    time.sleep(0.02)
  assert all(p.poll() is None for p in procs)
  assert kill_all(procs) == [-signal.SIGKILL, -signal.SIGKILL]

  procs = start_local([], 2, 2, port=procs[0].port, **fake_main)
  assert wait_all(procs, timeout=30) == [0, 0]
  assert all('args' in p.output for p in procs)


def test_wait_all_timeout(fake_main):
  from launch.local import start_local, wait_all

  procs = start_local(['--sleep'], 2, 1, **fake_main)
  with pytest.raises(subprocess.TimeoutExpired):
    wait_all(procs, timeout=0.5, grace=2)
  assert all(p.poll() is not None for p in procs)


def test_output_prefix(fake_main, capsys):
  import io

  from launch.local import launch_local

  sink = io.StringIO()
  launch_local([], 2, 1, timeout=30, **{**fake_main, 'sink': sink})
  lines = sink.getvalue().splitlines()
  assert {line[:5] for line in lines} == {'[p0] ', '[p1] '}
  assert any(line.startswith('[p1] args ') and '--process_id=1' in line for line in lines)


def test_tpu_real_mode_with_fake_gcloud(tmp_path):
  """Without --dry-run (gcloud faked): the queued resource is polled until ACTIVE, logs are teed to --log, and
  --teardown deletes the resource even though training failed; the training exit status is returned."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  calls = tmp_path / 'calls'
  _write_exe(
    bin_dir / 'gcloud',
    f"""#!/bin/bash
echo "$*" >> {calls}
case "$*" in
  *"queued-resources describe"*) n=$(grep -c describe {calls}); [ "$n" -ge 2 ] && echo ACTIVE || echo PROVISIONING ;;
  *effjax.main*) echo "training output"; exit 7 ;;
esac
""",
  )
  log = tmp_path / 'logs' / 'run.log'
  args = [
    *BASE,
    '--queued',
    '--teardown',
    '--poll-interval',
    '1',
    '--repo',
    'https://example.com/effjax.git',
    '--log',
    str(log),
    *PASS,
  ]
  r = _bash(TPU, args, f'{bin_dir}{os.pathsep}{os.environ["PATH"]}', tmp_path)
  assert r.returncode == 7, r.stderr
  lines = calls.read_text().splitlines()
  assert lines[0].startswith('compute tpus queued-resources create t ')
  assert sum('queued-resources describe' in line for line in lines) == 2
  assert any('effjax.main' in line for line in lines)
  assert lines[-1] == 'compute tpus queued-resources delete t --zone=us-central2-b --force --quiet'
  assert 'training output' in r.stdout and 'training output' in log.read_text()
  assert 'training exited with status 7' in r.stderr
