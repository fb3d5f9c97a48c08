"""Run a multi-process effjax job on this machine (CPU devices), e.g. to test multi-host code paths.

    python -m launch.local --num_processes=2 --devices_per_process=4 [--port=N] [--dry-run] -- \\
        --config=configs/gpt.py:tiny --workdir=/tmp/run --config.mesh.data=-1

starts ``num_processes`` copies of ``python -m effjax.main <args>`` with
``--coordinator_address=localhost:PORT --num_processes=N --process_id=i``, each with
``XLA_FLAGS=--xla_force_host_platform_device_count=D`` and ``JAX_PLATFORMS=cpu`` (so the job sees N*D devices), prints
their output line by line prefixed with ``[p{i}]``, and exits non-zero (after terminating the others) as soon as one
process fails.

From Python (tests):

    procs = start_local(args, num_processes=2, devices_per_process=4)   # list of LocalProcess (subprocess.Popen)
    ...; kill_all(procs)                                               # SIGKILL mid-run (whole process groups)
    procs = start_local(args, 2, 4)                                      # start again (resume)
    codes = wait_all(procs, timeout=120)                                 # return codes; raises on timeout
    results = launch_local(args, 2, 4, timeout=120)                      # start + wait: CompletedProcess list
    results[0].stdout                                                   # that process's output (stdout+stderr)
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import IO, Mapping, Sequence

__all__ = [
  'LocalProcess',
  'build_command',
  'build_env',
  'free_port',
  'kill_all',
  'launch_local',
  'main',
  'start_local',
  'terminate_all',
  'wait_all',
]

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DEVICE_COUNT_FLAG = re.compile(r'--xla_force_host_platform_device_count=\S*')


def free_port(host: str = '') -> int:
  """A TCP port that is free right now (bound to all interfaces, like the JAX coordinator service)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, 0))
    return s.getsockname()[1]


def build_command(
  args: Sequence[str],
  process_id: int,
  num_processes: int,
  port: int,
  *,
  module: str = 'effjax.main',
  python: str | None = None,
  host: str = 'localhost',
) -> list[str]:
  """argv of process ``process_id``: ``python -m effjax.main <args> --coordinator_address=... ...``."""
  return [
    python or sys.executable,
    '-m',
    module,
    *args,
    f'--coordinator_address={host}:{port}',
    f'--num_processes={num_processes}',
    f'--process_id={process_id}',
  ]


def _merge_xla_flags(existing: str | None, devices_per_process: int) -> str:
  rest = _DEVICE_COUNT_FLAG.sub('', existing or '').split()
  return ' '.join([f'--xla_force_host_platform_device_count={devices_per_process}', *rest])


def build_env(
  devices_per_process: int,
  env: Mapping[str, str] | None = None,
  *,
  base: Mapping[str, str] | None = None,
) -> dict[str, str]:
  """The environment of every process.

  ``base`` (default ``os.environ``) updated with ``env``; then XLA_FLAGS gets
  ``--xla_force_host_platform_device_count=D`` (replacing any count already there, keeping other flags),
  JAX_PLATFORMS defaults to ``cpu`` unless ``env`` sets it, output is unbuffered, and the repository root is put
  on PYTHONPATH so ``effjax`` imports from any working directory.
  """
  out = dict(os.environ if base is None else base)
  env = dict(env or {})
  out.update(env)
  out['XLA_FLAGS'] = _merge_xla_flags(out.get('XLA_FLAGS'), devices_per_process)
  if 'JAX_PLATFORMS' not in env:
    out['JAX_PLATFORMS'] = 'cpu'
  out['PYTHONUNBUFFERED'] = '1'
  paths = [p for p in out.get('PYTHONPATH', '').split(os.pathsep) if p]
  if REPO_ROOT not in paths:
    paths.append(REPO_ROOT)
  out['PYTHONPATH'] = os.pathsep.join(paths)
  return out


class LocalProcess(subprocess.Popen):
  """A Popen whose combined stdout/stderr is pumped by a thread: each line is echoed to ``sink`` prefixed with
  ``[p{i}] `` and kept in ``self.lines`` (``self.output`` joins them). It runs in its own process group so that
  ``kill_all`` / ``terminate_all`` also reach any children it spawned (e.g. data-loader workers)."""

  def __init__(
    self,
    argv: list[str],
    process_id: int,
    env: dict[str, str],
    cwd: str | None,
    sink: IO[str] | None,
    lock: threading.Lock,
  ):
    super().__init__(
      argv,
      env=env,
      cwd=cwd,
      stdin=subprocess.DEVNULL,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      errors='replace',
      bufsize=1,
      start_new_session=True,
    )
    self.process_id = process_id
    self.command = argv
    self.lines: list[str] = []
    self._sink = sink
    self._lock = lock
    self._pump = threading.Thread(target=self._read, name=f'launch.local-p{process_id}', daemon=True)
    self._pump.start()

  def _read(self) -> None:
    assert self.stdout is not None
    prefix = f'[p{self.process_id}] '
    for line in self.stdout:
      line = line.rstrip('\n')
      self.lines.append(line)
      if self._sink is not None:
        with self._lock:
          try:
            self._sink.write(prefix + line + '\n')
            self._sink.flush()
          except (OSError, ValueError):  # closed sink: keep collecting
            pass

  @property
  def output(self) -> str:
    return ''.join(line + '\n' for line in self.lines)

  def join_output(self, timeout: float | None = 10.0) -> None:
    """Wait for the output pump to reach EOF (after the process has exited)."""
    self._pump.join(timeout)

  def signal_group(self, sig: int) -> None:
    """Send ``sig`` to the process group (the process and anything it spawned); no-op if gone."""
    try:
      os.killpg(self.pid, sig)
    except (ProcessLookupError, PermissionError):
      if self.poll() is None:
        try:
          self.send_signal(sig)
        except ProcessLookupError:
          pass


def start_local(
  args: Sequence[str],
  num_processes: int,
  devices_per_process: int,
  port: int | None = None,
  env: Mapping[str, str] | None = None,
  *,
  cwd: str | None = None,
  module: str = 'effjax.main',
  python: str | None = None,
  sink: IO[str] | None = sys.stdout,
) -> list[LocalProcess]:
  """Start the processes and return immediately. ``sink=None`` keeps the output silent (still collected in
  ``proc.lines``). A free port is picked when ``port`` is None; the port used is ``procs[0].port``."""
  if num_processes < 1:
    raise ValueError(f'num_processes must be >= 1, got {num_processes}')
  if devices_per_process < 1:
    raise ValueError(f'devices_per_process must be >= 1, got {devices_per_process}')
  port = free_port() if port is None else port
  full_env = build_env(devices_per_process, env)
  lock = threading.Lock()
  procs: list[LocalProcess] = []
  try:
    for i in range(num_processes):
      argv = build_command(args, i, num_processes, port, module=module, python=python)
      p = LocalProcess(argv, i, full_env, cwd, sink, lock)
      p.port = port
      procs.append(p)
  except BaseException:
    kill_all(procs)
    raise
  return procs


def _finish(procs: Sequence[LocalProcess]) -> None:
  for p in procs:
    try:
      p.wait(timeout=30)
    except subprocess.TimeoutExpired:
      p.signal_group(signal.SIGKILL)
      p.wait()
    p.join_output()


def kill_all(procs: Sequence[LocalProcess], sig: int = signal.SIGKILL) -> list[int]:
  """Send ``sig`` (default SIGKILL, i.e. a crash) to every process group, wait for them, return the codes."""
  for p in procs:
    if p.poll() is None:
      p.signal_group(sig)
  _finish(procs)
  return [p.returncode for p in procs]


def terminate_all(procs: Sequence[LocalProcess], grace: float = 10.0) -> list[int]:
  """SIGTERM every running process; SIGKILL those still alive after ``grace`` seconds."""
  for p in procs:
    if p.poll() is None:
      p.signal_group(signal.SIGTERM)
  deadline = time.monotonic() + grace
  for p in procs:
    try:
      p.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      p.signal_group(signal.SIGKILL)
  _finish(procs)
  return [p.returncode for p in procs]


def wait_all(
  procs: Sequence[LocalProcess], timeout: float | None = None, *, grace: float = 10.0, poll_interval: float = 0.05
) -> list[int]:
  """Wait for every process and return their exit codes (negative: killed by that signal).

  As soon as one exits non-zero the others are terminated (SIGTERM, then SIGKILL after ``grace`` s), since the
  survivors would otherwise block in a collective. After ``timeout`` seconds all are terminated and
  ``subprocess.TimeoutExpired`` is raised.
  """
  deadline = None if timeout is None else time.monotonic() + timeout
  while True:
    codes = [p.poll() for p in procs]
    if any(c not in (None, 0) for c in codes):
      return terminate_all(procs, grace)
    if all(c is not None for c in codes):
      _finish(procs)
      return codes  # type: ignore[return-value]
    if deadline is not None and time.monotonic() >= deadline:
      terminate_all(procs, grace)
      raise subprocess.TimeoutExpired([p.command for p in procs], timeout)
    time.sleep(poll_interval)


def launch_local(
  args: Sequence[str],
  num_processes: int,
  devices_per_process: int,
  port: int | None = None,
  env: Mapping[str, str] | None = None,
  timeout: float | None = None,
  **kwargs,
) -> list[subprocess.CompletedProcess]:
  """Start the processes, wait for all of them (see ``wait_all``) and return one ``CompletedProcess`` per
  process (``returncode``; ``stdout`` holds its combined stdout and stderr). Extra keyword arguments go to
  ``start_local`` (``cwd``, ``module``, ``python``, ``sink``)."""
  procs = start_local(args, num_processes, devices_per_process, port, env, **kwargs)
  try:
    codes = wait_all(procs, timeout)
  except BaseException:
    if any(p.poll() is None for p in procs):
      terminate_all(procs, grace=2.0)
    raise
  return [subprocess.CompletedProcess(p.command, code, stdout=p.output, stderr=None) for p, code in zip(procs, codes)]


def _exit_code(codes: Sequence[int]) -> int:
  for c in codes:
    if c > 0:
      return c
  for c in codes:
    if c < 0:
      return 128 - c
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if '--' in argv:
    i = argv.index('--')
    own, passthrough = argv[:i], argv[i + 1 :]
  else:
    own, passthrough = argv, []
  parser = argparse.ArgumentParser(
    prog='python -m launch.local',
    description='Run N local `python -m effjax.main` processes as one multi-process JAX job on CPU devices. '
    'Arguments after `--` go to effjax.main.',
  )
  parser.add_argument('--num_processes', '--num-processes', type=int, default=2)
  parser.add_argument('--devices_per_process', '--devices-per-process', type=int, default=4)
  parser.add_argument('--port', type=int, default=None, help='coordinator port (default: a free one)')
  parser.add_argument('--timeout', type=float, default=None, help='seconds before everything is terminated')
  parser.add_argument('--module', default='effjax.main', help=argparse.SUPPRESS)
  parser.add_argument(
    '--dry-run', '--dry_run', dest='dry_run', action='store_true', help='print the commands instead of running them'
  )
  ns, unknown = parser.parse_known_args(own)
  if unknown:
    parser.error(f'unrecognized arguments: {" ".join(unknown)} (effjax.main arguments go after `--`)')
  if ns.num_processes < 1:
    parser.error(f'--num_processes must be >= 1, got {ns.num_processes}')
  if ns.devices_per_process < 1:
    parser.error(f'--devices_per_process must be >= 1, got {ns.devices_per_process}')
  if ns.port is not None and not 0 < ns.port < 65536:
    parser.error(f'--port must be in 1..65535, got {ns.port}')

  if ns.dry_run:
    port = ns.port if ns.port is not None else free_port()
    env = build_env(ns.devices_per_process)
    shown = ' '.join(f'{k}={shlex.quote(env[k])}' for k in ('XLA_FLAGS', 'JAX_PLATFORMS'))
    for i in range(ns.num_processes):
      cmd = build_command(passthrough, i, ns.num_processes, port, module=ns.module)
      print(f'+ {shown} {shlex.join(cmd)}')
    return 0

  procs = start_local(passthrough, ns.num_processes, ns.devices_per_process, ns.port, module=ns.module)

  def _on_term(signum, frame):  # forward `kill` of the launcher to the children
    raise KeyboardInterrupt

  signal.signal(signal.SIGTERM, _on_term)
  try:
    codes = wait_all(procs, ns.timeout)
  except KeyboardInterrupt:
    terminate_all(procs)
    return 130
  except subprocess.TimeoutExpired:
    print(f'launch.local: error: timed out after {ns.timeout:g}s; terminated all processes', file=sys.stderr)
    return 124
  rc = _exit_code(codes)
  if rc:
    failed = ', '.join(f'p{p.process_id}={c}' for p, c in zip(procs, codes) if c)
    print(f'launch.local: error: process(es) failed: {failed}', file=sys.stderr)
  return rc


if __name__ == '__main__':
  sys.exit(main())
