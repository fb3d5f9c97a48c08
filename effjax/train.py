"""`train_and_evaluate(config, workdir)`: the one training loop for every family.

Data → sharded global batches → one jitted step (explicit in/out shardings, donated state) → metrics, periodic
evaluation and Orbax checkpoints. Resume is automatic and exact: the state, the data-iterator position and the
per-step dropout keys (folded from the seed and the step) are all restored or re-derived.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import signal
import threading

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from effjax import (
  accelerator,
  accounting,
  checkpoint,
  metrics as metrics_lib,
  optim,
  paths,
  sharding,
  state as state_lib,
)
from effjax.data import dataset as dataset_lib, pipeline
from effjax import errors
from effjax.errors import DivergedError, EffjaxError, Preempted


def cross_entropy(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
  """Mean next-token loss in f32."""
  return optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV.astype(jnp.float32), targets_BxT).mean()


def make_train_step(setup: state_lib.Setup, config):
  model, optimizer, accum = setup.model, setup.optimizer, config.train.grad_accum
  param_shardings = setup.state_shardings.params
  base_key = jax.random.key(config.seed)

  def loss_fn(params, extra, batch, key):
    logits = model.apply({'params': params, **extra}, batch['inputs'], train=True, rngs={'dropout': key})
    return cross_entropy(logits, batch['targets'])

  def step(state: state_lib.TrainState, batch):
    key = jax.random.fold_in(base_key, state.step)
    grad_fn = jax.value_and_grad(loss_fn)
    if accum == 1:
      loss, grads = grad_fn(state.params, state.extra, batch, key)
    else:
      # Micro-batch i takes rows i, i+A, i+2A, ... so every device keeps working on every micro-batch.
      micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1), batch)

      def body(carry, xs):
        loss_sum, grad_sum = carry
        i, mb = xs
        loss, grads = grad_fn(state.params, state.extra, mb, jax.random.fold_in(key, i))
        return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

      zeros = jax.lax.with_sharding_constraint(jax.tree.map(jnp.zeros_like, state.params), param_shardings)
      (loss, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), (jnp.arange(accum), micro))
      loss, grads = loss / accum, jax.tree.map(lambda g: g / accum, grads)
    # Gradients are laid out like their params: with FSDP they are reduce-scattered, never whole on a device.
    grads = jax.lax.with_sharding_constraint(grads, param_shardings)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    new_state = state.replace(
      step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state
    )
    return new_state, {'loss': loss, 'grad_norm': optax.tree.norm(grads)}

  return jax.jit(
    step,
    in_shardings=(setup.state_shardings, setup.batch_sharding),
    out_shardings=(setup.state_shardings, None),
    donate_argnums=0,
  )


def make_eval_step(setup: state_lib.Setup):
  def step(params, extra, batch):
    logits = setup.model.apply({'params': params, **extra}, batch['inputs'], train=False)
    return cross_entropy(logits, batch['targets'])

  return jax.jit(step, in_shardings=(setup.state_shardings.params, setup.state_shardings.extra, setup.batch_sharding))


def evaluate_loss(setup, state, batches, eval_step=None) -> float:
  """Token-weighted mean validation loss over a fixed list of batches. A loop that evaluates repeatedly passes the
  `eval_step` it built once: a fresh one is a new function to jax, traced and compiled again on every call."""
  eval_step = eval_step or make_eval_step(setup)
  total, count = 0.0, 0
  for batch in batches:
    n = batch['targets'].size
    total += float(eval_step(state.params, state.extra, _shard(setup, batch))) * n
    count += n
  return total / count


def eval_metrics(loss: float, bytes_per_token: float) -> dict:
  return {'loss': loss, 'ppl': math.exp(min(loss, 50.0)), 'bpb': loss / math.log(2) / bytes_per_token}


def _shard(setup, batch):
  return sharding.global_batch(batch, setup.batch_sharding)


def check_train_config(config) -> None:
  t = config.train
  for key in ('steps', 'batch_size', 'grad_accum', 'log_every', 'eval_every', 'eval_batches'):
    if not isinstance(t[key], int) or t[key] <= 0:
      raise EffjaxError(f'train.{key}={t[key]!r} is invalid; it must be a positive integer')
  metrics_lib.check_wandb(t.wandb_project)
  accelerator.check_config(t)
  if t.batch_size % t.grad_accum:
    raise EffjaxError(f'train.grad_accum={t.grad_accum} does not divide train.batch_size={t.batch_size}')
  if config.checkpoint.every <= 0 or config.checkpoint.keep <= 0:
    raise EffjaxError(
      f'checkpoint.every={config.checkpoint.every} / checkpoint.keep={config.checkpoint.keep} '
      'are invalid; both must be positive integers'
    )
  if not isinstance(t.stop_at, int) or t.stop_at < 0:
    raise EffjaxError(f'train.stop_at={t.stop_at!r} is invalid; it must be 0 (off) or the step to stop at')
  for key in ('b1', 'b2'):
    if not 0 <= t[key] < 1:
      raise EffjaxError(f'train.{key}={t[key]!r} is invalid; Adam betas must be in [0, 1), e.g. 0.9 / 0.95')
  if not 0 <= t.min_lr_ratio <= 1:
    raise EffjaxError(f'train.min_lr_ratio={t.min_lr_ratio!r} is invalid; it must be in [0, 1]')
  for key in ('eps', 'weight_decay', 'grad_clip', 'warmup_steps'):
    if t[key] < 0 or (key == 'eps' and t[key] == 0):
      raise EffjaxError(f'train.{key}={t[key]!r} is invalid; it must be {"> 0" if key == "eps" else ">= 0"}')
  if config.data.seq_len <= 0 or config.data.seq_len > config.model.max_len:
    raise EffjaxError(
      f'data.seq_len={config.data.seq_len} is invalid; it must be in 1..model.max_len={config.model.max_len}'
    )
  check_backend(config.model)
  accelerator.check_backend(t)


def check_backend(model_config) -> None:
  """model.attention_impl='cudnn' (cuDNN flash attention via jax.nn.dot_product_attention) needs an NVIDIA GPU
  and a 16-bit compute dtype: refuse other setups in one line instead of failing deep inside XLA."""
  if model_config.get('attention_impl', 'xla') != 'cudnn':
    return
  backend = jax.default_backend()
  if backend != 'gpu':
    raise EffjaxError(
      f"model.attention_impl='cudnn' needs an NVIDIA GPU with cuDNN, but this run's backend is "
      f"{backend!r}; use model.attention_impl='xla' (the default; it runs everywhere)"
    )
  if model_config.dtype not in ('bfloat16', 'float16'):
    raise EffjaxError(
      f"model.attention_impl='cudnn' computes in 16 bits but model.dtype={model_config.dtype!r}; "
      "set model.dtype='bfloat16' or use model.attention_impl='xla'"
    )
  if model_config.get('attn_dropout', 0.0) > 0:
    logging.warning(
      'model.attn_dropout=%s: training attention uses the XLA path (cuDNN only where there is no '
      'attention dropout: evaluation)',
      model_config.attn_dropout,
    )


def resolve_vocab(config, tokenizer) -> ml_collections.ConfigDict:
  """Fills model.vocab_size from the tokenizer; a smaller explicit vocabulary is an error."""
  config = ml_collections.ConfigDict(config.to_dict())
  if config.model.vocab_size == 0:
    config.model.vocab_size = tokenizer.vocab_size
  elif config.model.vocab_size < tokenizer.vocab_size:
    raise EffjaxError(
      f'model.vocab_size={config.model.vocab_size} is smaller than the {tokenizer.kind} '
      f'tokenizer vocabulary ({tokenizer.vocab_size}); use 0 to take it from the tokenizer'
    )
  return config


# What a run keeps in its workdir, and of which kind: a file where a directory belongs (or the reverse) is refused
# before anything is read or written, instead of failing deep inside Orbax or TensorBoard.
WORKDIR_DIRS = ('checkpoints', 'checkpoints.corrupt', 'data', 'tb')
WORKDIR_FILES = ('config.json', 'summary.json', 'metrics.jsonl', 'eval.json', '.lock')


def check_workdir_layout(workdir: str) -> None:
  if paths.isfile(workdir):
    raise EffjaxError(f'workdir {workdir!r} is a file, not a directory; choose a directory (nothing was changed)')
  for name in WORKDIR_DIRS:
    path = paths.join(workdir, name)
    if paths.isfile(path):
      raise EffjaxError(f'{path} is a file, but effjax keeps a directory there; move it aside (nothing was changed)')
  for name in WORKDIR_FILES:
    path = paths.join(workdir, name)
    if paths.isdir(path):
      raise EffjaxError(f'{path} is a directory, but effjax writes a file there; move it aside (nothing was changed)')


def prepare_workdir(workdir: str) -> None:
  """Makes the workdir and proves it writable with a probe file that is removed again (on gs:// an object: a
  missing permission is one line here, not a traceback from a later write)."""
  paths.check(workdir, 'workdir')
  try:
    paths.makedirs(workdir)
    probe = paths.join(workdir, f'.write_probe{os.getpid()}')
    paths.write_text_atomic(probe, 'ok')
    paths.remove(probe)
  except OSError as e:
    if errors.is_no_space(e):
      raise errors.no_space_error(workdir, None, 'the workdir') from None
    raise EffjaxError(
      f'workdir {workdir!r} is not writable ({e.strerror or e}); choose a directory you can write'
    ) from None


class WorkdirLock:
  """Two runs on one workdir would corrupt each other's checkpoints: the second one refuses.

  Locally the lock is an flock on the workdir directory itself, so taking it creates and changes nothing;
  `.lock` only records the holder's pid for the refusal message, and is written by `claim()` once the run is
  known to proceed (a refused run never rewrites it). On gs:// there is no flock: `.lock` is then the lock
  itself, an object created only if absent and deleted when the run ends (effjax/locks.py states the rules for a
  holder that is gone). Only process 0 locks (the workdir is shared by all processes).
  """

  def __init__(self, workdir: str):
    self.workdir = workdir
    self._fd = None
    self._remote = None

  def __enter__(self):
    if jax.process_index() != 0:
      return self
    if paths.is_remote(self.workdir):
      from effjax import locks  # pylint: disable=import-outside-toplevel

      self._remote = locks.ObjectLock(paths.join(self.workdir, '.lock'), f'workdir {self.workdir!r}').acquire()
      return self
    self._fd = os.open(self.workdir, os.O_RDONLY)
    try:
      fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(self._fd)
      self._fd = None
      raise EffjaxError(
        f'workdir {self.workdir!r} is in use by another effjax run (pid {self._holder()}); wait '
        'for it to finish or use another workdir'
      ) from None
    return self

  def _holder(self) -> str:
    try:
      with open(os.path.join(self.workdir, '.lock'), encoding='utf-8') as f:
        return f.read().strip() or '?'
    except OSError:
      return '?'

  def claim(self) -> None:
    if self._fd is not None:
      _write_text_atomic(os.path.join(self.workdir, '.lock'), str(os.getpid()))

  def __exit__(self, *exc):
    if self._remote is not None:
      self._remote.release()
      self._remote = None
    if self._fd is not None:
      os.close(self._fd)  # closing the descriptor releases the flock
      self._fd = None


def workdir_lock(workdir: str) -> WorkdirLock:
  return WorkdirLock(workdir)


def _write_text_atomic(path: str, text: str) -> None:
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w', encoding='utf-8') as f:
    f.write(text)
  os.replace(tmp, path)


class _StopRequest:
  """SIGTERM/SIGINT set a flag; the loop saves a checkpoint at the next step boundary and exits cleanly."""

  def __init__(self):
    self.requested = False
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    if self.requested:  # a second signal: stop now, without the checkpoint
      self.__exit__()
      if signum == signal.SIGINT:
        raise KeyboardInterrupt
      raise SystemExit(128 + signum)
    self.requested = True
    logging.warning('received signal %d: saving a checkpoint at the end of this step, then exiting', signum)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}


def _stop_agreed(stop) -> bool:
  """Whether to stop now. With several processes a signal reaches each at a different step, so the flags are
  combined (any process stopping stops all) at the same point of every step: no process is left waiting in a
  collective (the checkpoint) that the others skipped."""
  if jax.process_count() == 1:
    return stop.requested
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  return bool(np.any(multihost_utils.process_allgather(np.int32(stop.requested))))


class DataCache:
  """The workdir's own dataset (workdir/data, prepared implicitly from data.corpus). If this run had to prepare
  it and is then refused or fails before training, `discard()` removes it again (a killed prepare's leftovers
  with it), so a refused run leaves no dataset behind; `commit()` keeps it once the run proceeds. A shared
  data.dataset, or a complete dataset already in the workdir, is only read."""

  def __init__(self, config, workdir: str):
    self.directory = epath.Path(pipeline.dataset_dir(config.data, workdir))
    own = not str(config.data.get('dataset', '') or '').strip()
    self.created = own and not (self.directory / dataset_lib.MANIFEST).exists()
    self.kept = False

  def commit(self) -> None:
    self.kept = True

  def discard(self) -> None:
    if self.created and not self.kept and jax.process_count() == 1 and self.directory.exists():
      self.directory.rmtree()


def load_data(config, workdir: str):
  """The run's dataset. A shared `data.dataset` is only read (no process tokenizes). Otherwise, with several
  processes, process 0 prepares the workdir's own dataset while the others wait at a barrier, then they read it;
  a process whose workdir does not hold process 0's dataset (host-local paths on a multi-host slice) prepares the
  same one itself."""
  if jax.process_count() == 1 or str(config.data.get('dataset', '') or '').strip():
    bundle = pipeline.load(config.data, workdir)
  elif jax.process_index() == 0:
    try:
      bundle = pipeline.load(config.data, workdir)
    finally:  # also on failure: the others then fail with the same one-line error instead of hanging
      multihost_utils.sync_global_devices('effjax.data_prepared')
  else:
    multihost_utils.sync_global_devices('effjax.data_prepared')
    bundle = pipeline.load(config.data, workdir)
  check_vocabulary(bundle, config.data)
  return bundle, resolve_vocab(config, bundle.tokenizer)


def check_vocabulary(bundle, data_config) -> None:
  if bundle.tokenizer.vocab_size < 2:
    raise EffjaxError(
      f'the corpus {data_config.corpus!r} gives a {bundle.tokenizer.kind} vocabulary of '
      f'{bundle.tokenizer.vocab_size} token(s) (is it all NUL bytes?); there is nothing to learn'
    )
  if bundle.tokenizer.kind == 'bpe' and bundle.tokenizer.vocab_size < data_config.bpe_vocab_size:
    logging.warning(
      'data.bpe_vocab_size=%d: the corpus supports only %d BPE tokens; training with %d',
      data_config.bpe_vocab_size,
      bundle.tokenizer.vocab_size,
      bundle.tokenizer.vocab_size,
    )


def data_identity(bundle) -> dict:
  """What a checkpoint records about its data: the dataset manifest's fingerprint and its tokenizer's sha256."""
  return {'fingerprint': bundle.fingerprint, 'tokenizer_sha256': bundle.identity['tokenizer_sha256']}


def check_same_data(meta: dict, identity: dict, config, where: str) -> None:
  """A checkpoint resumes only on the data it was trained on, unless checkpoint.allow_other_data is set."""
  names = {'fingerprint': 'data fingerprint', 'tokenizer_sha256': 'tokenizer'}
  diffs = [
    f'{names[k]} {meta[k][:16]} (now {identity[k][:16]})'
    for k in names
    if meta.get(k) is not None and meta[k] != identity[k]
  ]
  if not diffs:
    return
  what = ' and '.join(diffs)
  if config.checkpoint.get('allow_other_data', False):
    logging.warning(
      'checkpoint in %s was trained with %s; continuing on this data (checkpoint.allow_other_data=True)', where, what
    )
    return
  source = config.data.get('dataset') or config.data.corpus
  raise EffjaxError(
    f'checkpoint in {where} was trained with {what}: {source!r} is not the data it was trained '
    'on; use that data, another workdir, or --config.checkpoint.allow_other_data=True to continue '
    'on this data on purpose'
  )


@jax.jit
def _finite(leaves):
  return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves]))


def _all_finite(tree) -> bool:
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return bool(_finite(leaves)) if leaves else True


def restore_or_init(setup, config, ckpt: checkpoint.Checkpointer, data_iterator, where: str, quarantine: bool = True):
  """Restores the newest checkpoint that loads, falling back to older ones with a warning.

  A step that cannot be read (partial write, corrupt files, non-finite values) is reported and, when an older
  step restores and `quarantine` is set, moved to checkpoints.corrupt/ so it is neither retried on every start
  nor silently kept as "the latest". If checkpoints exist but none restores, that is an error (never a silent
  restart from scratch). Returns (state, meta), meta None for a fresh start.
  """
  state, meta, bad = restore_newest(setup, config, ckpt, data_iterator, where)
  if bad and quarantine:
    quarantine_steps(ckpt, bad, int(state.step))
  return state, meta


def restore_newest(
  setup, config, ckpt: checkpoint.Checkpointer, data_iterator, where: str, identity: dict | None = None
):
  """(state, meta, unrestorable steps) without changing anything on disk; `identity` (data_identity()) makes a
  checkpoint of other data an error."""
  bad = []
  for step in sorted(ckpt.all_steps(), reverse=True):
    try:
      meta = ckpt.restore_meta(step)
    except Exception as e:  # pylint: disable=broad-except
      bad.append((step, f'unreadable metadata: {_first_line(e)}'))
      logging.warning('checkpoint step %d in %s is unreadable (%s); trying an older one', step, where, bad[-1][1])
      continue
    if identity is not None:
      check_same_data(meta, identity, config, where)
    checkpoint.check_compatible(meta, config.model, where)
    try:
      state, meta = ckpt.restore(step, setup.abstract_state, data_iterator)
    except Exception as e:  # pylint: disable=broad-except
      if 'tree structures do not match' in str(e):  # intact, but another optimizer/state layout than this config
        raise EffjaxError(
          f'checkpoint step {step} in {where} holds a train state of another structure than this '
          'config builds (an optimizer setting such as train.grad_clip changed?); use the '
          'settings it was trained with, or another workdir'
        ) from None
      bad.append((step, _first_line(e)))
      logging.warning('checkpoint step %d in %s failed to restore (%s); trying an older one', step, where, bad[-1][1])
      continue
    if not _all_finite((state.params, state.extra)):
      bad.append((step, 'non-finite parameters'))
      logging.warning('checkpoint step %d in %s holds non-finite parameters; trying an older one', step, where)
      continue
    return state, meta, [s for s, _ in bad]
  if bad:
    steps = ', '.join(f'step {s}: {why}' for s, why in bad)
    raise EffjaxError(f'no checkpoint in {where} restores ({steps}); move {ckpt.directory} aside to start over')
  return setup.init_fn(jax.random.key(config.seed)), None, []


def quarantine_steps(ckpt: checkpoint.Checkpointer, steps, resumed: int) -> None:
  """Moves unrestorable steps to checkpoints.corrupt/ (process 0), then every process re-reads the steps."""
  if jax.process_index() == 0:
    for bad_step in steps:
      moved = ckpt.quarantine(bad_step)
      logging.warning('moved unrestorable checkpoint step %d to %s; resuming from step %d', bad_step, moved, resumed)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('effjax_checkpoint_quarantine')
  ckpt.reload()


def _first_line(e: BaseException) -> str:
  lines = str(e).strip().splitlines()
  text = lines[0] if lines else type(e).__name__
  return text if len(text) <= 240 else text[:237] + '...'


def train_and_evaluate(config, workdir: str, devices=None, progress: bool = True) -> dict:
  """Trains (or resumes) the configured model in `workdir`; returns the final eval metrics.

  Nothing in the workdir is written until every check has passed (config, data, checkpoint, data identity, the
  steps left): a refused or failed run leaves an existing workdir byte for byte as it was. Raises EffjaxError (a
  user mistake), DivergedError (non-finite values; the last good checkpoint is kept) or Preempted (SIGTERM /
  SIGINT stopped the run after its checkpoint was saved). `devices` restricts the mesh to a subset of
  jax.devices() (default: all of them).
  """
  check_train_config(config)
  check_model_and_optimizer(config, devices)
  check_workdir_layout(workdir)
  prepare_workdir(workdir)
  cache = DataCache(config, workdir)
  try:
    # The signal handlers cover setup too: a SIGTERM while the data is prepared stops before anything is written.
    with workdir_lock(workdir) as lock, _StopRequest() as stop:
      try:
        return _train(config, workdir, devices, progress, stop, lock, cache)
      finally:
        cache.discard()
  except Exception as e:  # pylint: disable=broad-except
    if errors.is_no_space(e) and not isinstance(e, EffjaxError):
      raise errors.no_space_error(getattr(e, 'filename', None) or workdir, None, 'run files') from None
    raise


def check_model_and_optimizer(config, devices=None) -> None:
  """Config mistakes that would otherwise surface after the data cache is written (nothing is created first)."""
  from effjax.models import build_model  # pylint: disable=import-outside-toplevel

  model_config = ml_collections.ConfigDict(config.model.to_dict())
  if model_config.vocab_size == 0:  # filled from the tokenizer later; any positive size validates the rest
    model_config.vocab_size = 256
  build_model(model_config)
  try:  # shape mistakes that only the layers see (e.g. model.num_blocks not dividing a width), abstractly
    state_lib.abstract_variables(model_config)
  except (ValueError, TypeError) as e:
    raise EffjaxError(f'the model config is invalid: {_first_line(e)}') from None
  optim.make_optimizer(config.train)
  sharding.make_mesh(config.mesh, devices)
  sharding.rules(config.mesh)


def check_resume(config, meta, start: int, workdir: str) -> None:
  """Refuses a resume with nothing to train; warns (one line each) when the batch shape changed."""
  if meta is None:
    return
  t = config.train
  if t.steps < start:
    raise EffjaxError(
      f'train.steps={t.steps} is below the step of the checkpoint in {workdir} ({start}); nothing '
      'to train: raise train.steps to continue, or use another workdir'
    )
  if t.stop_at and t.stop_at <= start < t.steps:
    raise EffjaxError(
      f'train.stop_at={t.stop_at} is not after the step of the checkpoint in {workdir} ({start}); '
      'nothing to train: use a later train.stop_at, or 0'
    )
  for key, saved, now in (
    ('data.seq_len', meta.get('seq_len'), config.data.seq_len),
    ('train.batch_size', meta.get('batch_size'), t.batch_size),
  ):
    if saved is not None and saved != now:
      logging.warning(
        '%s changed from %s (checkpoint step %d) to %s: training continues with the new value', key, saved, start, now
      )


def _open_data(config, workdir: str, devices):
  """The run's data, mesh and state layout, its training iterator and its (sharded) validation batches."""
  bundle, config = load_data(config, workdir)
  setup = state_lib.make_setup(config, devices=devices)
  t = config.train
  nproc = jax.process_count()
  divisor = sharding.batch_divisor(setup.mesh, setup.rules)
  if t.batch_size % divisor or t.batch_size % nproc:
    raise EffjaxError(
      f'train.batch_size={t.batch_size} must be divisible by the data-parallel devices '
      f'({divisor}) and processes ({nproc})'
    )
  train_iter = pipeline.make_train_iterator(
    bundle.train_tokens,
    seq_len=config.data.seq_len,
    batch_size=t.batch_size,
    seed=config.seed,
    process_index=jax.process_index(),
    process_count=nproc,
  )
  val_batches = pipeline.eval_batches(
    bundle.val_tokens, seq_len=config.data.seq_len, batch_size=t.batch_size, max_batches=t.eval_batches
  )
  vocab = bundle.tokenizer.vocab_size
  val_batches = [eval_rows(pipeline.check_ids(b, vocab, bundle.directory), divisor) for b in val_batches]
  return bundle, config, setup, train_iter, val_batches


def _train(config, workdir: str, devices, progress: bool, stop, lock, cache) -> dict:
  bundle, config, setup, train_iter, val_batches = _open_data(config, workdir, devices)
  t = config.train
  identity = data_identity(bundle)
  ckpt_dir = paths.join(workdir, 'checkpoints')
  ckpt = checkpoint.Checkpointer(ckpt_dir, config.checkpoint.keep) if paths.isdir(ckpt_dir) else None
  writer = profiler = None
  try:
    if ckpt is not None:
      state, saved_meta, bad = restore_newest(setup, config, ckpt, train_iter, workdir, identity)
    else:
      state, saved_meta, bad = setup.init_fn(jax.random.key(config.seed)), None, []
    start = int(state.step)
    check_resume(config, saved_meta, start, workdir)
    if start >= t.steps:
      logging.warning(
        'the checkpoint in %s is at step %d = train.steps: the run is finished, nothing to train', workdir, start
      )
      return {}
    if _stop_agreed(stop):
      raise Preempted(f'stopped by a signal before step {start + 1}; nothing was saved: rerun to resume')
    first_batch = pipeline.check_ids(next(train_iter), bundle.tokenizer.vocab_size, bundle.directory)  # refused here

    # ---- every check passed: from here on the run writes to its workdir
    lock.claim()
    cache.commit()
    accelerator.enable_compile_cache(t, workdir)
    if bad:
      quarantine_steps(ckpt, bad, start)
    if ckpt is None:
      ckpt = checkpoint.Checkpointer(ckpt_dir, config.checkpoint.keep)
    logging.info(
      'data fingerprint %s; %d train / %d val tokens; start at step %d',
      bundle.fingerprint,
      len(bundle.train_tokens),
      len(bundle.val_tokens),
      start,
    )
    writer = metrics_lib.MetricsWriter(
      workdir, t.steps, start, progress=progress, wandb_project=t.wandb_project, run_config=config.to_dict()
    )
    profiler = accelerator.StepProfiler(t.profile_steps, workdir)
    loop = _Loop(config, setup, workdir, bundle, identity, saved_meta, start, writer, ckpt, profiler)
    state, step, stopping = loop.run(state, first_batch, train_iter, val_batches, stop)
    profiler.stop()  # a run that ended inside its window (train.steps or a signal) still writes the trace
    ckpt.close()
  except BaseException:
    # The error being raised is the one to report: a second one from closing (say the disk is still full) is not.
    for stop_fn in (profiler and profiler.stop, ckpt and ckpt.close, writer and writer.close):
      if stop_fn:
        with contextlib.suppress(Exception):
          stop_fn()
    raise
  writer.close()
  if stopping:
    raise Preempted(
      f'stopped by a signal: saved a checkpoint at step {step}; rerun the same command to resume'
      if step > start
      else f'stopped by a signal before step {start + 1}; rerun to resume'
    )
  return loop.last_eval


class _Loop:
  """The steps of one run, from `start` to train.stop_at or train.steps: it logs, evaluates and checkpoints at
  their boundaries, and stops cleanly at the step every process agreed on after a signal."""

  def __init__(self, config, setup, workdir, bundle, identity, saved_meta, start, writer, ckpt, profiler):
    self.config, self.setup, self.workdir, self.bundle = config, setup, workdir, bundle
    self.identity, self.start, self.writer, self.ckpt, self.profiler = identity, start, writer, ckpt, profiler
    t = config.train
    self.tokens_per_step = t.batch_size * config.data.seq_len
    self.tokens_at_start = saved_meta.get('tokens_seen', start * self.tokens_per_step) if saved_meta else 0
    self.step_compute = accounting.step_compute(config)
    self.train_step = make_train_step(setup, config)
    self.eval_step = make_eval_step(setup)
    self.schedule = optim.learning_rate_schedule(t)
    self.clock = metrics_lib.StepClock(
      self.tokens_per_step,
      self.tokens_per_step * accounting.summarize(config)['train_flops_per_token'],
      metrics_lib.peak_flops(setup.mesh.devices.flat),
    )
    self.last_eval, self.described, self.pending = {}, False, []

  def run(self, state, first_batch, train_iter, val_batches, stop):
    """Returns the final state, its step and whether a signal stopped the run."""
    t, vocab, directory = self.config.train, self.bundle.tokenizer.vocab_size, self.bundle.directory
    step, last = self.start, min(t.steps, t.stop_at) if t.stop_at else t.steps
    stopping = _stop_agreed(stop)
    while step < last and not stopping:
      self.profiler.before(step + 1)
      raw = first_batch if first_batch is not None else pipeline.check_ids(next(train_iter), vocab, directory)
      first_batch = None
      state, step_metrics = self.train_step(state, _shard(self.setup, raw))
      step += 1
      self.profiler.after(step, step_metrics['loss'])
      if step == self.start + 1:  # the first step compiles: the clock starts after it
        jax.block_until_ready(step_metrics['loss'])
        self.clock.resume()
      else:
        self.clock.count()
      self.pending.append((step_metrics['loss'], step_metrics['grad_norm']))
      self.writer.advance()
      stopping = _stop_agreed(stop)  # every process sees the same decision at the same step
      every = (t.log_every, self.config.checkpoint.every, t.eval_every)
      if any(step % n == 0 for n in every) or step in (t.steps, last) or stopping:
        jax.block_until_ready(step_metrics['loss'])  # steps are dispatched ahead: wait until they ran
        self.clock.pause()  # logging, eval and checkpointing below are not step time
        self._log(step, step_metrics)
      if step % t.eval_every == 0 or step == t.steps:
        self.last_eval = eval_metrics(
          evaluate_loss(self.setup, state, val_batches, self.eval_step), self.bundle.val_bytes_per_token
        )
        self.writer.write(step, 'eval', self.last_eval)
      if step % self.config.checkpoint.every == 0 or step == last or stopping:
        self._save(step, state, train_iter)
      self.clock.resume()
    return state, step, stopping

  def _log(self, step: int, step_metrics) -> None:
    """Checks the losses and gradient norms since the last boundary (non-finite: stop) and logs their mean."""
    t = self.config.train
    losses, grad_norms = np.asarray(jax.device_get(self.pending), np.float64).reshape(-1, 2).T
    self.pending = []
    for name, values in (('loss', losses), ('gradient norm', grad_norms)):
      nonfinite = np.flatnonzero(~np.isfinite(values))
      if nonfinite.size:
        raise DivergedError(
          f'{name} became {values[nonfinite[0]]} at step '
          f'{step - len(values) + nonfinite[0] + 1}; stopping (the last good checkpoint is '
          'kept); lower train.lr or check the data'
        )
    if step % t.log_every == 0 or step == t.steps:
      self.writer.write(
        step,
        'train',
        {
          'loss': float(losses.mean()),
          'lr': float(self.schedule(step - 1)),
          'grad_norm': float(step_metrics['grad_norm']),
          **self.clock.rates(),
          'tokens_seen': step * self.tokens_per_step,
          'compute': step * self.step_compute['compute'],
          'compute_frozen_free': step * self.step_compute['compute_frozen_free'],
        },
      )

  def _save(self, step: int, state, train_iter) -> None:
    if not _all_finite((state.params, state.extra)):  # never checkpoint a diverged state
      raise DivergedError(
        f'parameters became non-finite by step {step}; stopping (the last good checkpoint '
        'is kept); lower train.lr or check the data'
      )
    if not self.described:
      self._describe_run()
      self.described = True
    self.writer.flush()  # the rows up to this checkpoint are stored before it (gs:// rewrites metrics.jsonl)
    config = self.config
    meta = {
      'step': step,
      'tokens_seen': self.tokens_at_start + (step - self.start) * self.tokens_per_step,
      'family': config.model.family,
      'architecture': checkpoint.architecture(config.model),
      'seq_len': config.data.seq_len,
      'batch_size': config.train.batch_size,
      **self.identity,
    }
    self.ckpt.save(step, state, train_iter, meta)

  def _describe_run(self) -> None:
    """config.json and summary.json describe the checkpoints: written with this run's first one, so a run that
    diverges or fails before saving leaves the previous description in place."""
    if jax.process_index() == 0:
      checkpoint.write_json_atomic(paths.join(self.workdir, 'config.json'), self.config.to_dict())
      checkpoint.write_json_atomic(paths.join(self.workdir, 'summary.json'), accounting.summarize(self.config))


def eval_rows(batch: dict, divisor: int) -> dict:
  """This process's rows of an evaluation batch, trimmed to a multiple of the data-parallel devices."""
  n, i = jax.process_count(), jax.process_index()
  unit = math.lcm(divisor, n)
  rows = len(batch['inputs']) // unit * unit
  if rows == 0:
    raise EffjaxError(
      f'the validation split gives {len(batch["inputs"])} windows, fewer than the '
      f'{unit} data-parallel devices; use more data or a larger data.val_fraction'
    )
  per_process = rows // n
  return {k: v[i * per_process : (i + 1) * per_process] for k, v in batch.items()}
