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
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from effjax import accounting, checkpoint, metrics as metrics_lib, optim, sharding, state as state_lib
from effjax.data import pipeline
from effjax.errors import EffjaxError


def cross_entropy(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
  """Mean next-token loss in f32."""
  return optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV.astype(jnp.float32), targets_BxT).mean()


def make_train_step(setup: state_lib.Setup, config):
  model, optimizer, accum = setup.model, setup.optimizer, config.train.grad_accum
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

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      (loss, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), (jnp.arange(accum), micro))
      loss, grads = loss / accum, jax.tree.map(lambda g: g / accum, grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                              opt_state=opt_state)
    return new_state, {'loss': loss, 'grad_norm': optax.tree.norm(grads)}

  return jax.jit(step, in_shardings=(setup.state_shardings, setup.batch_sharding),
                 out_shardings=(setup.state_shardings, None), donate_argnums=0)


def make_eval_step(setup: state_lib.Setup):
  def step(params, extra, batch):
    logits = setup.model.apply({'params': params, **extra}, batch['inputs'], train=False)
    return cross_entropy(logits, batch['targets'])
  return jax.jit(step, in_shardings=(setup.state_shardings.params, setup.state_shardings.extra,
                                     setup.batch_sharding))


def evaluate_loss(setup, state, batches) -> float:
  """Token-weighted mean validation loss over a fixed list of batches."""
  eval_step = make_eval_step(setup)
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
  if t.batch_size % t.grad_accum:
    raise EffjaxError(f'train.grad_accum={t.grad_accum} does not divide train.batch_size={t.batch_size}')
  if config.checkpoint.every <= 0 or config.checkpoint.keep <= 0:
    raise EffjaxError(f'checkpoint.every={config.checkpoint.every} / checkpoint.keep={config.checkpoint.keep} '
                      'are invalid; both must be positive integers')
  if config.data.seq_len <= 0 or config.data.seq_len > config.model.max_len:
    raise EffjaxError(f'data.seq_len={config.data.seq_len} is invalid; it must be in 1..model.max_len='
                      f'{config.model.max_len}')


def resolve_vocab(config, tokenizer) -> ml_collections.ConfigDict:
  """Fills model.vocab_size from the tokenizer; a smaller explicit vocabulary is an error."""
  config = ml_collections.ConfigDict(config.to_dict())
  if config.model.vocab_size == 0:
    config.model.vocab_size = tokenizer.vocab_size
  elif config.model.vocab_size < tokenizer.vocab_size:
    raise EffjaxError(f'model.vocab_size={config.model.vocab_size} is smaller than the {tokenizer.kind} '
                      f'tokenizer vocabulary ({tokenizer.vocab_size}); use 0 to take it from the tokenizer')
  return config


def prepare_workdir(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f'.write_probe{os.getpid()}')
    with open(probe, 'w', encoding='utf-8') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise EffjaxError(f'workdir {workdir!r} is not writable ({e.strerror}); choose a directory you can write')


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """Two runs on one workdir would corrupt each other's checkpoints: the second one refuses."""
  if jax.process_index() != 0:
    yield
    return
  with open(os.path.join(workdir, '.lock'), 'w', encoding='utf-8') as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise EffjaxError(f'workdir {workdir!r} is in use by another effjax run (pid lock held); wait for it or '
                        'use another workdir') from None
    f.write(str(os.getpid()))
    f.flush()
    yield


class _StopRequest:
  """SIGTERM/SIGINT set a flag; the loop saves a checkpoint at the next step boundary and exits cleanly."""

  def __init__(self):
    self.requested = False
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.requested = True

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def load_data(config, workdir: str):
  bundle = pipeline.prepare_data(config.data, os.path.join(workdir, 'data'))
  return bundle, resolve_vocab(config, bundle.tokenizer)


def restore_or_init(setup, config, ckpt: checkpoint.Checkpointer, data_iterator, where: str):
  """Restores the newest checkpoint that loads, falling back to older ones with a warning."""
  for step in sorted(ckpt.all_steps(), reverse=True):
    try:
      meta = ckpt.restore_meta(step)
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('checkpoint step %d in %s is unreadable (%s); trying an older one', step, where, e)
      continue
    checkpoint.check_compatible(meta, config.model, where)
    try:
      state, meta = ckpt.restore(step, setup.abstract_state, data_iterator)
      return state, meta
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('checkpoint step %d in %s failed to restore (%s); trying an older one', step, where, e)
  return setup.init_fn(jax.random.key(config.seed)), None


def train_and_evaluate(config, workdir: str, devices=None) -> dict:
  """Trains (or resumes) the configured model in `workdir`; returns the final eval metrics.

  `devices` restricts the mesh to a subset of jax.devices() (default: all of them).
  """
  check_train_config(config)
  prepare_workdir(workdir)
  with workdir_lock(workdir):
    return _train(config, workdir, devices)


def _train(config, workdir: str, devices) -> dict:
  bundle, config = load_data(config, workdir)
  setup = state_lib.make_setup(config, devices=devices)
  t = config.train
  nproc = jax.process_count()
  divisor = sharding.batch_divisor(setup.mesh, setup.rules)
  if t.batch_size % divisor or t.batch_size % nproc:
    raise EffjaxError(f'train.batch_size={t.batch_size} must be divisible by the data-parallel devices '
                      f'({divisor}) and processes ({nproc})')
  train_iter = pipeline.make_train_iterator(bundle.train_tokens, seq_len=config.data.seq_len,
                                            batch_size=t.batch_size, seed=config.seed,
                                            process_index=jax.process_index(), process_count=nproc)
  val_batches = pipeline.eval_batches(bundle.val_tokens, seq_len=config.data.seq_len,
                                      batch_size=t.batch_size, max_batches=t.eval_batches)
  val_batches = [eval_rows(b, divisor) for b in val_batches]
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), config.checkpoint.keep)
  state, _ = restore_or_init(setup, config, ckpt, train_iter, workdir)
  start = int(state.step)
  if jax.process_index() == 0:
    checkpoint.write_json_atomic(os.path.join(workdir, 'config.json'), config.to_dict())
    summary = accounting.summarize(config, setup=setup)
    checkpoint.write_json_atomic(os.path.join(workdir, 'summary.json'), summary)
  logging.info('data fingerprint %s; %d train / %d val tokens; start at step %d', bundle.fingerprint,
               len(bundle.train_tokens), len(bundle.val_tokens), start)
  tokens_per_step = t.batch_size * config.data.seq_len
  step_compute = accounting.step_compute(config, setup.model, tokens_per_step)
  train_step = make_train_step(setup, config)
  schedule = optim.learning_rate_schedule(config.train)
  writer = metrics_lib.MetricsWriter(workdir, t.steps, start, progress=jax.process_index() == 0)

  def meta(step):
    return {'step': step, 'tokens_seen': step * tokens_per_step, 'family': config.model.family,
            'architecture': checkpoint.architecture(config.model), 'fingerprint': bundle.fingerprint}

  last_eval = {}
  pending, tick = [], time.time()
  try:
    with _StopRequest() as stop:
      step = start
      last = min(t.steps, t.stop_at) if t.stop_at else t.steps
      while step < last and not stop.requested:
        batch = _shard(setup, next(train_iter))
        state, step_metrics = train_step(state, batch)
        step += 1
        pending.append(step_metrics['loss'])
        writer.advance()
        boundary = step % t.log_every == 0 or step in (t.steps, last) or step % config.checkpoint.every == 0
        if boundary or stop.requested:
          losses = np.asarray(jax.device_get(pending), np.float64)
          bad = np.flatnonzero(~np.isfinite(losses))
          if bad.size:
            raise EffjaxError(f'loss became {losses[bad[0]]} at step {step - len(losses) + bad[0] + 1}; '
                              'stopping (the last good checkpoint is kept); lower train.lr or check the data')
          elapsed = time.time() - tick
          if step % t.log_every == 0 or step == t.steps:
            writer.write(step, 'train', {
                'loss': float(losses.mean()), 'lr': float(schedule(step - 1)),
                'grad_norm': float(step_metrics['grad_norm']),
                'tokens_per_sec': len(losses) * tokens_per_step / max(elapsed, 1e-9),
                'tokens_seen': step * tokens_per_step, 'compute': step * step_compute['compute'],
                'compute_frozen_free': step * step_compute['compute_frozen_free']})
          pending, tick = [], time.time()
        if step % t.eval_every == 0 or step == t.steps:
          last_eval = eval_metrics(evaluate_loss(setup, state, val_batches), bundle.val_bytes_per_token)
          writer.write(step, 'eval', last_eval)
        if step % config.checkpoint.every == 0 or step == last or stop.requested:
          ckpt.save(step, state, train_iter, meta(step))
      if stop.requested:
        logging.warning('stop requested: saved a checkpoint at step %d; rerun to resume', step)
  finally:
    ckpt.close()
    writer.close()
  return last_eval


def eval_rows(batch: dict, divisor: int) -> dict:
  """This process's rows of an evaluation batch, trimmed to a multiple of the data-parallel devices."""
  n, i = jax.process_count(), jax.process_index()
  unit = math.lcm(divisor, n)
  rows = len(batch['inputs']) // unit * unit
  if rows == 0:
    raise EffjaxError(f'the validation split gives {len(batch["inputs"])} windows, fewer than the '
                      f'{unit} data-parallel devices; use more data or a larger data.val_fraction')
  per_process = rows // n
  return {k: v[i * per_process:(i + 1) * per_process] for k, v in batch.items()}
