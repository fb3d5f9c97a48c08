"""Reliability under faults: preemption (SIGTERM / SIGINT), corrupt or partial checkpoints, two runs on one
workdir, and NaN/inf divergence."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax import checkpoint, state as state_lib, train
from effjax.errors import EffjaxError, Preempted
from experiments.soak import handlers_installed
from tests.helpers import ROOT, one_device, tiny_config, xla_flags
from tests.test_bad_input import assert_one_error_line, cli, snapshot

pytestmark = pytest.mark.slow  # end-to-end: `make test-slow` and CI run it, `make test` does not

STEPS = 40  # long enough that a signal sent after step 3 always lands mid-run
LONG = {'train.steps': STEPS, 'train.log_every': 1, 'train.eval_every': 10_000, 'checkpoint.every': 10_000}


def train_losses(workdir) -> dict:
  """step -> loss of the train lines of metrics.jsonl (a resumed run's lines replace earlier ones)."""
  out = {}
  path = os.path.join(workdir, 'metrics.jsonl')
  if os.path.exists(path):
    with open(path, encoding='utf-8') as f:
      for line in f:
        try:
          record = json.loads(line)
        except json.JSONDecodeError:  # a line being written right now
          continue
        if record.get('split') == 'train':
          out[record['step']] = record['loss']
  return out


def wait_for_step(workdir, step, timeout=300.0, proc=None):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if max(train_losses(workdir), default=0) >= step:
      return
    if proc is not None and proc.poll() is not None:
      raise AssertionError(f'the run ended early (exit {proc.returncode})')
    time.sleep(0.02)
  raise AssertionError(f'no step {step} in {workdir}/metrics.jsonl after {timeout}s')


def checkpoint_steps(workdir) -> list[int]:
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), 3, read_only=True)
  try:
    return sorted(ckpt.all_steps())
  finally:
    ckpt.close()


def restore(config, workdir, step=None):
  """(state, meta) of a checkpoint (the newest readable one by default), without moving anything."""
  bundle_config = train.resolve_vocab(config, _tokenizer(workdir))
  setup = state_lib.make_setup(bundle_config, devices=one_device())
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), 3, read_only=True)
  try:
    if step is None:
      return train.restore_or_init(setup, bundle_config, ckpt, None, workdir, quarantine=False)
    return ckpt.restore(step, setup.abstract_state)
  finally:
    ckpt.close()


def _tokenizer(workdir):
  from effjax.data import tokenizers  # pylint: disable=import-outside-toplevel

  return tokenizers.load_tokenizer(os.path.join(workdir, 'data'))


def tree(*directories) -> dict:
  """Every file's content hash and every directory, `.lock` included: "nothing changed" means this is equal."""
  out = {}
  for directory in directories:
    if os.path.isfile(directory):
      with open(directory, 'rb') as f:
        out[directory] = hashlib.sha256(f.read()).hexdigest()
    for root, dirs, files in os.walk(directory):
      for name in dirs:
        out[os.path.join(root, name) + '/'] = 'dir'
      for name in files:
        with open(os.path.join(root, name), 'rb') as f:
          out[os.path.join(root, name)] = hashlib.sha256(f.read()).hexdigest()
  return out


def assert_same_params(a, b):
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope='module')
def reference(tmp_path_factory, corpus_dir):
  """The uninterrupted run every preempted run must reproduce (one device, like the CLI subprocesses)."""
  workdir = str(tmp_path_factory.mktemp('reference') / 'run')
  config = tiny_config(corpus_dir, **LONG)
  train.train_and_evaluate(config, workdir, devices=one_device(), progress=False)
  losses = train_losses(workdir)
  assert sorted(losses) == list(range(1, STEPS + 1))
  return {'config': config, 'losses': losses, 'workdir': workdir}


# --------------------------------------------------------------------------------------------------------
# Preemption


def test_sigint_saves_and_resume_is_bit_identical(tmp_path, reference):
  workdir = str(tmp_path / 'run')
  handler = signal.getsignal(signal.SIGINT)
  sent = threading.Event()

  def interrupt():
    wait_for_step(workdir, 3)
    os.kill(os.getpid(), signal.SIGINT)
    sent.set()

  thread = threading.Thread(target=interrupt, daemon=True)
  thread.start()
  with pytest.raises(Preempted, match=r'saved a checkpoint at step \d+; rerun the same command to resume'):
    train.train_and_evaluate(reference['config'], workdir, devices=one_device(), progress=False)
  thread.join(timeout=60)
  assert sent.is_set()
  stopped = max(train_losses(workdir))
  assert 3 <= stopped < STEPS and checkpoint_steps(workdir) == [stopped]
  assert signal.getsignal(signal.SIGINT) is handler  # the run restored the handlers it replaced
  train.train_and_evaluate(reference['config'], workdir, devices=one_device(), progress=False)
  assert train_losses(workdir) == reference['losses']
  final, _ = restore(reference['config'], workdir)
  expected, _ = restore(reference['config'], reference['workdir'])
  assert_same_params(final, expected)


def test_second_run_on_a_workdir_refuses(tmp_path, corpus_dir):
  """The lock is an flock on the workdir: the refused run creates nothing, not even `.lock`, and names the pid
  the running one recorded."""
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'keep.txt').write_text('untouched')
  with train.workdir_lock(str(workdir)) as lock:
    before = tree(str(workdir))
    with pytest.raises(EffjaxError, match=r'workdir .* is in use by another effjax run \(pid \?\)'):
      train.train_and_evaluate(tiny_config(corpus_dir, **{'train.steps': 2}), str(workdir), progress=False)
    assert tree(str(workdir)) == before
    lock.claim()
    before = tree(str(workdir))
    with pytest.raises(EffjaxError, match=rf'in use by another effjax run \(pid {os.getpid()}\)'):
      train.train_and_evaluate(tiny_config(corpus_dir, **{'train.steps': 2}), str(workdir), progress=False)
    assert tree(str(workdir)) == before and not (workdir / 'data').exists()


# --------------------------------------------------------------------------------------------------------
# Corrupt and partial checkpoints

SIX = {'train.steps': 6, 'checkpoint.every': 2, 'train.log_every': 2, 'train.eval_every': 6}


@pytest.fixture(scope='module')
def six_step_runs(tmp_path_factory, corpus_dir):
  """An uninterrupted 6-step run, and the same run stopped at step 4 (checkpoints 2 and 4)."""
  root = tmp_path_factory.mktemp('corrupt')
  full, stopped = str(root / 'full'), str(root / 'stopped')
  config = tiny_config(corpus_dir, **SIX)
  final_eval = train.train_and_evaluate(config, full, devices=one_device(), progress=False)
  train.train_and_evaluate(
    tiny_config(corpus_dir, **SIX, **{'train.stop_at': 4}), stopped, devices=one_device(), progress=False
  )
  assert checkpoint_steps(stopped) == [2, 4]
  return {'config': config, 'full': full, 'stopped': stopped, 'final_eval': final_eval}


def _state_files(step_dir):
  return [f for f in glob.glob(os.path.join(step_dir, 'state', '**', 'd', '*'), recursive=True) if os.path.isfile(f)]


def _truncate(step_dir):
  for f in _state_files(step_dir):
    with open(f, 'r+b') as fh:
      fh.truncate(os.path.getsize(f) // 2)


def _garbage(step_dir):
  for f in _state_files(step_dir):
    size = os.path.getsize(f)
    with open(f, 'wb') as fh:
      fh.write(np.random.RandomState(0).bytes(size))


def _flip_bytes(step_dir):
  for f in _state_files(step_dir):
    data = bytearray(open(f, 'rb').read())
    for i in range(len(data) // 2, min(len(data), len(data) // 2 + 16)):
      data[i] ^= 0xFF
    open(f, 'wb').write(bytes(data))


def _missing_state(step_dir):  # a step directory whose state item never got written
  shutil.rmtree(os.path.join(step_dir, 'state'))


def _bad_meta(step_dir):
  with open(os.path.join(step_dir, 'meta', 'metadata'), 'w', encoding='utf-8') as f:
    f.write('{"step": 4, ')


def _bad_data_iterator(step_dir):
  for f in glob.glob(os.path.join(step_dir, 'data', '*.json')):
    with open(f, 'w', encoding='utf-8') as fh:
      fh.write('not json')


CORRUPTIONS = {
  'truncated': _truncate,
  'garbage': _garbage,
  'flipped_bytes': _flip_bytes,
  'missing_state': _missing_state,
  'bad_meta': _bad_meta,
  'bad_data_iterator': _bad_data_iterator,
}


@pytest.mark.parametrize('corruption', sorted(CORRUPTIONS))
def test_corrupt_latest_checkpoint_falls_back_with_a_warning(tmp_path, six_step_runs, corruption, caplog):
  workdir = str(tmp_path / 'run')
  shutil.copytree(six_step_runs['stopped'], workdir)
  CORRUPTIONS[corruption](os.path.join(workdir, 'checkpoints', '4'))
  config = train.resolve_vocab(six_step_runs['config'], _tokenizer(workdir))
  setup = state_lib.make_setup(config, devices=one_device())
  from effjax.data import pipeline  # pylint: disable=import-outside-toplevel

  bundle = pipeline.prepare_data(config.data, os.path.join(workdir, 'data'))
  iterator = pipeline.make_train_iterator(bundle.train_tokens, seq_len=32, batch_size=8, seed=0)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), 3)
  try:
    state, meta = train.restore_or_init(setup, config, ckpt, iterator, workdir)
  finally:
    ckpt.close()
  assert meta['step'] == 2 and int(state.step) == 2
  assert any('checkpoint step 4' in r.getMessage() and 'trying an older one' in r.getMessage() for r in caplog.records)
  assert any('moved unrestorable checkpoint step 4' in r.getMessage() for r in caplog.records)
  # the bad step is kept for inspection, out of the way of the next save
  assert checkpoint_steps(workdir) == [2] and os.path.isdir(os.path.join(workdir, 'checkpoints.corrupt', '4'))
  expected, _ = restore(six_step_runs['config'], six_step_runs['stopped'], step=2)
  assert_same_params(state, expected)


def test_fallback_then_resume_reproduces_the_uninterrupted_run(tmp_path, six_step_runs):
  workdir = str(tmp_path / 'run')
  shutil.copytree(six_step_runs['stopped'], workdir)
  _truncate(os.path.join(workdir, 'checkpoints', '4'))
  final_eval = train.train_and_evaluate(six_step_runs['config'], workdir, devices=one_device(), progress=False)
  assert final_eval == six_step_runs['final_eval']
  assert checkpoint_steps(workdir) == [2, 4, 6]  # step 4 written again (not silently skipped)
  for step in (4, 6):
    ours, _ = restore(six_step_runs['config'], workdir, step=step)
    theirs, _ = restore(six_step_runs['config'], six_step_runs['full'], step=step)
    assert_same_params(ours, theirs)
  # and the next start is clean: no warning loop, nothing else moved
  assert os.listdir(os.path.join(workdir, 'checkpoints.corrupt')) == ['4']


def test_all_checkpoints_unreadable_is_an_error_not_a_restart(tmp_path, six_step_runs):
  workdir = str(tmp_path / 'run')
  shutil.copytree(six_step_runs['stopped'], workdir)
  for step in (2, 4):
    _truncate(os.path.join(workdir, 'checkpoints', str(step)))
  before = snapshot(workdir)
  with pytest.raises(EffjaxError, match=r'no checkpoint in .* restores \(step 4: .*step 2: .*\); move .* aside') as e:
    train.train_and_evaluate(six_step_runs['config'], workdir, devices=one_device(), progress=False)
  assert '\n' not in str(e.value)
  assert snapshot(workdir) == before and not os.path.exists(os.path.join(workdir, 'checkpoints.corrupt'))


def test_interrupted_save_is_ignored(tmp_path, six_step_runs):
  """A crash during a save leaves orbax's temporary directory, never a step: the newest complete step wins."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(six_step_runs['stopped'], workdir)
  partial = os.path.join(workdir, 'checkpoints', '6.orbax-checkpoint-tmp-1234567')
  shutil.copytree(os.path.join(workdir, 'checkpoints', '4'), partial)
  _truncate(partial)
  state, meta = restore(six_step_runs['config'], workdir)
  assert meta['step'] == 4


# --------------------------------------------------------------------------------------------------------
# NaN / inf


def _inject(monkeypatch, bad_step: int, what: str):
  """Makes the jitted step return a non-finite loss (or non-finite params with a finite loss) at `bad_step`."""
  real = train.make_train_step

  def patched(setup, config):
    step_fn = real(setup, config)

    def wrapped(state, batch):
      new_state, metrics = step_fn(state, batch)
      if int(new_state.step) == bad_step:
        if what == 'loss':
          metrics = {**metrics, 'loss': metrics['loss'] * jnp.inf}
        else:
          new_state = new_state.replace(params=jax.tree.map(lambda x: x * jnp.nan, new_state.params))
      return new_state, metrics

    return wrapped

  monkeypatch.setattr(train, 'make_train_step', patched)


@pytest.mark.parametrize(
  'what,bad_step,pattern,last_good',
  [
    ('loss', 5, r'loss became inf at step 5', 4),  # detected at the next log boundary (6)
    ('params', 4, r'parameters became non-finite by step 4', 2),  # finite loss, diverged weights: not saved
  ],
)
def test_divergence_stops_with_the_step_and_keeps_the_last_good_checkpoint(
  tmp_path, corpus_dir, monkeypatch, what, bad_step, pattern, last_good
):
  _inject(monkeypatch, bad_step, what)
  workdir = str(tmp_path / 'run')
  config = tiny_config(
    corpus_dir, **{'train.steps': 8, 'train.log_every': 2, 'checkpoint.every': 2, 'train.eval_every': 8}
  )
  with pytest.raises(EffjaxError, match=pattern) as e:
    train.train_and_evaluate(config, workdir, devices=one_device(), progress=False)
  assert '\n' not in str(e.value)
  assert checkpoint_steps(workdir) == list(range(2, last_good + 1, 2))
  state, meta = restore(config, workdir)
  assert meta['step'] == last_good
  assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(state.params))


def test_huge_learning_rate_never_checkpoints_a_diverged_state(tmp_path, corpus_dir):
  config = tiny_config(
    corpus_dir,
    **{
      'train.steps': 20,
      'train.lr': 1e6,
      'train.grad_clip': 0.0,
      'train.warmup_steps': 0,
      'train.log_every': 1,
      'checkpoint.every': 1,
      'train.eval_every': 20,
    },
  )
  workdir = str(tmp_path / 'run')
  with pytest.raises(EffjaxError, match=r'(loss|gradient norm) became (nan|inf) at step (\d+)|non-finite') as e:
    train.train_and_evaluate(config, workdir, devices=one_device(), progress=False)
  steps = checkpoint_steps(workdir)
  import re  # pylint: disable=import-outside-toplevel

  match = re.search(r'step (\d+)', str(e.value))
  assert not steps or max(steps) < int(match.group(1))
  for step in steps:
    state, _ = restore(config, workdir, step=step)
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(state.params))


# --------------------------------------------------------------------------------------------------------
# Signals at every phase, against the real CLI: one workdir goes through them in turn and must still end with
# the losses of an uninterrupted run. The phase is observed, not guessed: "setup" = the process has installed
# its SIGTERM handler (/proc/PID/status SigCgt: training has begun, nothing written yet); "data prep" = the
# workdir's dataset (data/) is being prepared; "mid-step" = metrics.jsonl reached a step; "mid-save" = orbax's
# temporary step directory exists.

CHAIN_STEPS = 60
CHAIN = {'train.steps': CHAIN_STEPS, 'train.log_every': 1, 'train.eval_every': 10_000, 'checkpoint.every': 5}


def _cli_env():
  return {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': xla_flags(1)}


def _saves(workdir) -> set:
  return set(glob.glob(os.path.join(workdir, 'checkpoints', '*.orbax-checkpoint-tmp*')))


def _mid_save(workdir):
  """A phase test: this run is writing a step (a temporary step directory that a killed run did not leave)."""
  leftover = _saves(workdir)
  return lambda pid: handlers_installed(pid) and bool(_saves(workdir) - leftover)


def _signal_at(args, workdir, log, phase_reached, sig, timeout=600.0):
  """Runs the CLI, sends `sig` as soon as `phase_reached()` holds; returns (exit code, stderr)."""
  with open(log, 'w', encoding='utf-8') as err:
    proc = subprocess.Popen(args, cwd=ROOT, env=_cli_env(), stdout=subprocess.DEVNULL, stderr=err)
    try:
      deadline = time.time() + timeout
      while not phase_reached(proc.pid):
        assert proc.poll() is None, f'the run ended (exit {proc.returncode}) before the phase was reached'
        assert time.time() < deadline, 'phase not reached in time'
        time.sleep(0.002)
      proc.send_signal(sig)
      proc.wait(timeout=timeout)
    finally:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  with open(log, encoding='utf-8') as f:
    return proc.returncode, f.read()


@pytest.fixture(scope='module')
def chain_reference(tmp_path_factory, corpus_dir):
  workdir = str(tmp_path_factory.mktemp('chain_reference') / 'run')
  train.train_and_evaluate(tiny_config(corpus_dir, **CHAIN), workdir, devices=one_device(), progress=False)
  return train_losses(workdir)


def _checkpoint_files(workdir, steps) -> dict:
  return {
    k: v for k, v in tree(os.path.join(workdir, 'checkpoints')).items() if any(f'/checkpoints/{s}/' in k for s in steps)
  }


def test_signals_at_every_phase_then_resume_exactly(tmp_path, corpus_dir, chain_reference):
  workdir = str(tmp_path / 'run')
  args = [
    sys.executable,
    '-m',
    'effjax.main',
    '--config=configs/gpt.py:tiny',
    f'--workdir={workdir}',
    f'--config.data.corpus={corpus_dir}',
    '--progress=false',
    *[f'--config.{k}={v}' for k, v in CHAIN.items()],
  ]
  log = str(tmp_path / 'stderr')

  # 1. SIGKILL while the dataset is prepared: a half-prepared data/ without a manifest, nothing else
  manifest = os.path.join(workdir, 'data', 'manifest.json')
  code, err = _signal_at(
    args,
    workdir,
    log,
    lambda pid: handlers_installed(pid) and os.path.isdir(os.path.join(workdir, 'data')),
    signal.SIGKILL,
  )
  assert code == -signal.SIGKILL, err
  assert os.listdir(workdir) == ['data'] and not os.path.exists(manifest)

  # 2. SIGTERM in data prep / setup: exit 75 ("preempted"); the dataset this run prepared is removed again
  code, err = _signal_at(args, workdir, log, handlers_installed, signal.SIGTERM)
  assert code == 75, err
  assert (
    err.strip().splitlines()[-1].startswith('effjax: preempted: stopped by a signal before step 1; nothing was saved')
  ), err[-2000:]
  assert 'Traceback' not in err and os.listdir(workdir) == []

  # 3. SIGTERM mid-step: the checkpoint of that step is saved, exit 75
  code, err = _signal_at(args, workdir, log, lambda pid: max(train_losses(workdir), default=0) >= 3, signal.SIGTERM)
  assert code == 75 and 'Traceback' not in err, err[-3000:]
  stopped = max(train_losses(workdir))
  assert 3 <= stopped < CHAIN_STEPS and checkpoint_steps(workdir)[-1] == stopped
  assert re.search(rf'effjax: preempted: stopped by a signal: saved a checkpoint at step {stopped}', err)

  # 4. SIGKILL during setup of the resume: nothing changes
  before = tree(workdir)
  code, err = _signal_at(args, workdir, log, handlers_installed, signal.SIGKILL)
  assert code == -signal.SIGKILL and tree(workdir) == before

  # 5. SIGKILL mid-step: the steps since the last checkpoint are lost, nothing else
  saved = checkpoint_steps(workdir)
  kept = _checkpoint_files(workdir, saved)
  target = stopped + 3
  code, err = _signal_at(
    args, workdir, log, lambda pid: max(train_losses(workdir), default=0) >= target, signal.SIGKILL
  )
  assert code == -signal.SIGKILL
  assert all(kept[k] == v for k, v in _checkpoint_files(workdir, saved).items())
  assert checkpoint_steps(workdir)[-1] >= saved[-1]

  # 6. SIGKILL mid-save: the half-written step is never taken for a checkpoint
  code, err = _signal_at(args, workdir, log, _mid_save(workdir), signal.SIGKILL)
  assert code == -signal.SIGKILL
  newest_before_save = checkpoint_steps(workdir)[-1]

  # 7. SIGTERM mid-save: that save completes, the next step boundary saves again, exit 75
  code, err = _signal_at(args, workdir, log, _mid_save(workdir), signal.SIGTERM)
  assert code == 75 and 'Traceback' not in err, err[-3000:]
  assert checkpoint_steps(workdir)[-1] > newest_before_save

  # 8. the last run finishes; every step's loss equals the uninterrupted run's
  result = subprocess.run(args, cwd=ROOT, env=_cli_env(), capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  losses = train_losses(workdir)
  assert sorted(losses) == list(range(1, CHAIN_STEPS + 1))
  # other processes on one device: equal up to float32 reordering (bit-exactness is checked in-process above)
  np.testing.assert_allclose(
    [losses[s] for s in sorted(losses)], [chain_reference[s] for s in sorted(losses)], rtol=1e-5
  )


# --------------------------------------------------------------------------------------------------------
# The fault table: each case damages a copy of a real workdir (the step-4 run of SIX: checkpoints 2 and 4, or the
# finished one) or its inputs, runs the real CLI (in-process: absl flags + effjax.main.main) and asserts the exit
# code, the one line it printed and that nothing already written changed (`tree`, `.lock` included).

SIX_ARGS = [
  '--config=configs/gpt.py:tiny',
  '--workdir={W}',
  '--config.data.corpus={C}',
  '--progress=false',
  *[f'--config.{k}={v}' for k, v in SIX.items()],
]


def _file_at(name):
  def prep(ctx):
    path = os.path.join(ctx['W'], name)
    shutil.rmtree(path, ignore_errors=True)
    with open(path, 'w', encoding='utf-8') as f:
      f.write('a file where a directory belongs')

  return prep


def _dir_at(name):
  def prep(ctx):
    path = os.path.join(ctx['W'], name)
    if os.path.isfile(path):
      os.remove(path)
    os.makedirs(os.path.join(path, 'inside'))

  return prep


def _workdir_is_a_file(ctx):
  shutil.rmtree(ctx['W'])
  with open(ctx['W'], 'w', encoding='utf-8') as f:
    f.write('not a directory')


def _other_corpus(ctx):
  """The cache deleted and the corpus edited (one file fewer; the same characters, so the same vocabulary)."""
  shutil.rmtree(os.path.join(ctx['W'], 'data'))
  edited = os.path.join(ctx['T'], 'edited')
  shutil.copytree(ctx['C'], edited)
  os.remove(os.path.join(edited, 'module_03.py'))
  ctx['C'] = edited


def _truncate_file(relpath, keep=0.5):
  def prep(ctx):
    path = os.path.join(ctx['W'], relpath)
    with open(path, 'r+b') as f:
      f.truncate(int(os.path.getsize(path) * keep))

  return prep


def _remove(relpath):
  return lambda ctx: os.remove(os.path.join(ctx['W'], relpath))


def _corrupt_steps(*steps):
  def prep(ctx):
    for step in steps:
      _truncate(os.path.join(ctx['W'], 'checkpoints', str(step)))

  return prep


def _partial_save(ctx):
  ckpts = os.path.join(ctx['W'], 'checkpoints')
  shutil.copytree(os.path.join(ckpts, '4'), os.path.join(ckpts, '6.orbax-checkpoint-tmp-1234567'))
  _truncate(os.path.join(ckpts, '6.orbax-checkpoint-tmp-1234567'))


def _losses_match_full(ctx, six):
  theirs = train_losses(six['full'])
  ours = train_losses(ctx['W'])
  assert sorted(ours) == sorted(theirs)
  np.testing.assert_allclose([ours[s] for s in sorted(ours)], [theirs[s] for s in sorted(ours)], rtol=1e-5)


# name: (base workdir or None for a fresh one, prepare, extra args, exit code, stderr pattern, what must stay)
#   keep='all': the whole tree of {W}; 'saved': checkpoints, config.json, summary.json, data/ (the run trained)
FAULTS = {
  # files where directories belong and the reverse
  'checkpoints_is_a_file': ('stopped', _file_at('checkpoints'), [], 2, r'checkpoints is a file', 'all'),
  'tb_is_a_file': ('stopped', _file_at('tb'), [], 2, r'/tb is a file', 'all'),
  'data_is_a_file': ('stopped', _file_at('data'), [], 2, r'/data is a file', 'all'),
  'metrics_is_a_directory': ('stopped', _dir_at('metrics.jsonl'), [], 2, r'metrics.jsonl is a directory', 'all'),
  'config_is_a_directory': ('stopped', _dir_at('config.json'), [], 2, r'config.json is a directory', 'all'),
  'workdir_is_a_file': ('stopped', _workdir_is_a_file, [], 2, r'is a file, not a directory', 'all'),
  # nothing to train / nonsense
  'steps_below_checkpoint': (
    'stopped',
    None,
    ['--config.train.steps=3'],
    2,
    r'train.steps=3 is below the step of the checkpoint .* \(4\)',
    'all',
  ),
  'negative_stop_at': ('stopped', None, ['--config.train.stop_at=-5'], 2, r'train.stop_at=-5 is invalid', 'all'),
  'stop_at_before_checkpoint': (
    'stopped',
    None,
    ['--config.train.stop_at=2'],
    2,
    r'train.stop_at=2 is not after the step of the checkpoint',
    'all',
  ),
  'adam_b1_above_one': ('stopped', None, ['--config.train.b1=1.5'], 2, r'train.b1=1.5 is invalid', 'all'),
  'mesh_rule_unknown_axis': (
    'stopped',
    None,
    ["--config.mesh.rules=(('batch', 'nodes'),)"],
    2,
    r"mesh axis 'nodes', which does not exist",
    'all',
  ),
  'blocks_do_not_divide_width': (
    None,
    None,
    ['--config.model.mlp_kind=blockdiag', '--config.model.dense.num_blocks=3'],
    2,
    r'num_blocks=3',
    'all',
  ),
  'sample_negative_num_samples': (
    'stopped',
    None,
    ['--mode=sample', '--num_samples=-1'],
    2,
    r'--num_samples=-1 is invalid',
    'all',
  ),
  'sample_zero_num_samples': (
    'stopped',
    None,
    ['--mode=sample', '--num_samples=0'],
    2,
    r'--num_samples=0 is invalid',
    'all',
  ),
  # data identity and damaged caches
  'other_data': (
    'stopped',
    _other_corpus,
    [],
    2,
    r'trained with data fingerprint \w+ \(now \w+\).*'
    r'checkpoint.allow_other_data=True',
    'all',
  ),
  'truncated_train_shard': ('stopped', _truncate_file('data/train-00000.bin'), [], 2, r'train-00000.bin', 'all'),
  'missing_val_shard': ('stopped', _remove('data/val-00000.bin'), [], 2, r'missing shard .val-00000.bin.', 'all'),
  'truncated_manifest': (
    'stopped',
    _truncate_file('data/manifest.json'),
    [],
    2,
    r'manifest.json.* is unreadable or corrupt',
    'all',
  ),
  'truncated_tokenizer': ('stopped', _truncate_file('data/tokenizer.json'), [], 2, r'tokenizer', 'all'),
  # checkpoints
  'every_checkpoint_corrupt': (
    'stopped',
    _corrupt_steps(2, 4),
    [],
    2,
    r'no checkpoint in .* restores \(step 4: .*step 2: .*\)',
    'all',
  ),
  'finished_run_rerun': ('full', None, [], 0, r'the run is finished, nothing to train', 'all'),
  # divergence: exit 3, the checkpoints and the run's description stay those of the good run
  'optimizer_changed': (
    'stopped',
    None,
    ['--config.train.grad_clip=0.0'],
    2,
    r'checkpoint step 4 in .* holds a train state of another structure .*train.grad_clip',
    'all',
  ),
  'diverged': (
    'stopped',
    None,
    ['--config.train.lr=1e30', '--config.train.warmup_steps=0'],
    3,
    r'(loss|gradient norm) became (nan|inf) at step [56]|non-finite by step 6',
    'saved',
  ),
}

# Faults the run survives: exit 0, a warning line where the behaviour is surprising, the uninterrupted losses.
SURVIVED = {
  'latest_checkpoint_corrupt': ('stopped', _corrupt_steps(4), [], r'moved unrestorable checkpoint step 4'),
  'partial_save_left_behind': ('stopped', _partial_save, [], None),
  'other_data_allowed': (
    'stopped',
    _other_corpus,
    ['--config.checkpoint.allow_other_data=True'],
    r'continuing on this data \(checkpoint.allow_other_data=True\)',
  ),
  'batch_and_seq_len_changed': (
    'stopped',
    None,
    ['--config.train.batch_size=16', '--config.data.seq_len=16'],
    r'train.batch_size changed from 8 \(checkpoint step 4\) to 16',
  ),
}


def _context(tmp_path, six, corpus_dir, base):
  ctx = {'W': str(tmp_path / 'w'), 'C': corpus_dir, 'T': str(tmp_path)}
  if base:
    shutil.copytree(six[base], ctx['W'])
  return ctx


def _saved(snap: dict) -> dict:
  return {
    k: v for k, v in snap.items() if any(p in k for p in ('/checkpoints/', '/data/', 'config.json', 'summary.json'))
  }


def assert_error_line(code, err, want_code, pattern):
  """Exit code `want_code`, no traceback, and stderr ending in exactly one `effjax: error:` line matching."""
  assert code == want_code, err[-3000:]
  assert 'Traceback' not in err, err[-3000:]
  lines = [line for line in err.splitlines() if line.startswith('effjax: error:')]
  assert len(lines) == 1 and err.rstrip().splitlines()[-1] == lines[0], err[-3000:]
  assert re.search(pattern, lines[0]), lines[0]


@pytest.mark.parametrize('case', sorted(FAULTS))
def test_fault_is_one_line_and_changes_nothing(case, tmp_path, six_step_runs, corpus_dir, caplog):
  base, prep, extra, want_code, pattern, keep = FAULTS[case]
  ctx = _context(tmp_path, six_step_runs, corpus_dir, base)
  if prep:
    prep(ctx)
  before = tree(ctx['W'])
  code, _, err = cli(*[a.format(**ctx) for a in SIX_ARGS + extra])
  if want_code == 0:
    assert code == 0 and 'Traceback' not in err and re.search(pattern, caplog.text), err[-3000:]
  else:
    assert_error_line(code, err, want_code, pattern)
  if keep == 'all':
    assert tree(ctx['W']) == before
  else:
    assert _saved(tree(ctx['W'])) == _saved(before)


@pytest.mark.parametrize('case', sorted(SURVIVED))
def test_fault_is_survived(case, tmp_path, six_step_runs, corpus_dir, caplog):
  base, prep, extra, warning = SURVIVED[case]
  ctx = _context(tmp_path, six_step_runs, corpus_dir, base)
  if prep:
    prep(ctx)
  code, out, err = cli(*[a.format(**ctx) for a in SIX_ARGS + extra])
  assert code == 0 and 'Traceback' not in err, err[-3000:]
  if warning:  # logged warnings (absl) reach caplog in-process
    assert re.search(warning, caplog.text), caplog.text[-3000:]
  assert checkpoint_steps(ctx['W'])[-1] == 6
  if case in ('latest_checkpoint_corrupt', 'partial_save_left_behind'):
    _losses_match_full(ctx, six_step_runs)


def test_concurrent_run_refuses_and_leaves_the_lock(tmp_path, six_step_runs, corpus_dir):
  ctx = _context(tmp_path, six_step_runs, corpus_dir, 'stopped')
  with train.workdir_lock(ctx['W']) as lock:
    lock.claim()
    before = tree(ctx['W'])
    code, _, err = cli(*[a.format(**ctx) for a in SIX_ARGS])
    assert_one_error_line(code, err, rf'is in use by another effjax run \(pid {os.getpid()}\)')
    assert tree(ctx['W']) == before


# --------------------------------------------------------------------------------------------------------
# Disk full and read-only workdirs, made real: a small tmpfs (when this process may mount, as root on this
# machine) and a file-size limit (RLIMIT_FSIZE, which works everywhere) for the full disk; a tmpfs remounted
# read-only or `chattr +i` (root on ext4) for the read-only workdir; chmod does not stop root from writing.


def _can_mount() -> bool:
  import tempfile  # pylint: disable=import-outside-toplevel

  with tempfile.TemporaryDirectory() as probe:
    if (
      subprocess.run(
        ['mount', '-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', probe], capture_output=True, check=False
      ).returncode
      != 0
    ):
      return False
    subprocess.run(['umount', probe], capture_output=True, check=False)
    return True


CAN_MOUNT = shutil.which('mount') is not None and _can_mount()


class Tmpfs:
  def __init__(self, path: str):
    self.path = path
    os.makedirs(path)
    subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=64m', 'tmpfs', path], check=True, capture_output=True)

  def remount(self, option: str) -> None:
    subprocess.run(['mount', '-o', f'remount,{option}', self.path], check=True, capture_output=True)

  def leave_free(self, free: int) -> None:
    self.remount(f'size={shutil.disk_usage(self.path).used + free}')

  def close(self) -> None:
    subprocess.run(['umount', '-l', self.path], check=False, capture_output=True)


def _limited_cli(args, max_file_bytes):
  """The CLI in a subprocess whose files cannot grow past max_file_bytes (`ulimit -f`; SIGXFSZ ignored, so the
  write fails with EFBIG instead of killing the process). A shell sets the limit: no preexec_fn in a process that
  runs JAX threads."""
  script = f'trap "" XFSZ; ulimit -f {max_file_bytes // 1024}; exec "$@"'
  result = subprocess.run(
    ['bash', '-c', script, 'effjax', sys.executable, '-m', 'effjax.main', *args],
    cwd=ROOT,
    env=_cli_env(),
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  return result.returncode, result.stdout, result.stderr


# A real full filesystem where the machine lets the tests mount one; else a file-size limit (which tensorstore can
# slip under when it splits the checkpoint's data into several smaller files).
DISK_FULL = ['tmpfs'] if CAN_MOUNT else ['rlimit']


@pytest.mark.parametrize('mechanism', DISK_FULL)
def test_disk_full_is_one_line_keeps_the_last_checkpoint_and_resumes(mechanism, tmp_path, six_step_runs, corpus_dir):
  fs = Tmpfs(str(tmp_path / 'mnt')) if mechanism == 'tmpfs' else None
  try:
    ctx = {'W': str(tmp_path / ('mnt' if fs else '') / 'w'), 'C': corpus_dir, 'T': str(tmp_path)}
    shutil.copytree(six_step_runs['stopped'], ctx['W'])
    args = [a.format(**ctx) for a in SIX_ARGS]
    before = tree(ctx['W'])
    if fs:
      fs.leave_free(200_000)  # room for the logs and config.json, not for the 1.2 MB checkpoint
      code, _, err = cli(*args)
    else:
      code, _, err = _limited_cli(args, 600_000)  # the checkpoint's array file is 1.2 MB
    assert_error_line(
      code,
      err,
      2,
      r'no space left writing checkpoint step 6 to \S+/checkpoints/6 \(needs about '
      r'[\d,]+ bytes, [\d,]+ bytes free\); the last good checkpoint is kept',
    )
    checkpoints = lambda snap: {k: v for k, v in snap.items() if '/checkpoints/' in k}
    assert checkpoints(tree(ctx['W'])) == checkpoints(before)  # steps 2 and 4 intact, no partial step left
    if fs:
      fs.remount('size=64m')
    code, _, err = cli(*args)  # space freed: the rerun resumes from step 4 and ends like the uninterrupted run
    assert code == 0, err[-3000:]
    _losses_match_full(ctx, six_step_runs)
  finally:
    if fs:
      fs.close()


class Immutable:
  """`chattr +i` on every file and directory: even root cannot write, create or delete there."""

  def __init__(self, path: str):
    self.path = path
    subprocess.run(['chattr', '-R', '+i', path], check=True, capture_output=True)

  def close(self) -> None:
    subprocess.run(['chattr', '-R', '-i', self.path], check=False, capture_output=True)


@pytest.mark.parametrize(
  'mode,code,pattern',
  [
    ('train', 2, r'workdir .* is not writable \((Read-only file system|Operation not permitted)\)'),
    ('eval', 2, r'workdir .* is not writable \((Read-only file system|Operation not permitted)\)'),
    ('sample', 0, None),  # reading a read-only run is fine
  ],
)
def test_read_only_workdir(mode, code, pattern, tmp_path, six_step_runs, corpus_dir):
  fs = Tmpfs(str(tmp_path / 'mnt')) if CAN_MOUNT else None
  ctx = {'W': str(tmp_path / ('mnt' if fs else '') / 'w'), 'C': corpus_dir, 'T': str(tmp_path)}
  shutil.copytree(six_step_runs['stopped'], ctx['W'])
  guard = None
  try:
    if fs:
      fs.remount('ro')
    else:
      guard = Immutable(ctx['W'])
    before = tree(ctx['W'])
    got, out, err = cli(*[a.format(**ctx) for a in SIX_ARGS], f'--mode={mode}', '--max_new_tokens=4')
    if pattern:
      assert_error_line(got, err, code, pattern)
      assert not out.strip()
    else:
      assert got == 0 and out.strip(), err[-3000:]
    assert tree(ctx['W']) == before
  finally:
    if guard:
      guard.close()
    if fs:
      fs.close()
