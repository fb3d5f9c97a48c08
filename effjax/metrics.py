"""Run metrics: metrics.jsonl (one JSON object per line), TensorBoard events, and what a person or a cluster log
sees: a progress bar on a terminal, one plain line per logged step anywhere else (SLURM output, `| tee`).

Step time, tokens/s and MFU count only the train steps themselves (StepClock): not the first step's compilation,
not evaluation, not checkpointing. MFU divides the network's training FLOPs (accounting's
`train_flops_per_token`) by the devices' peak: the published dense bf16 peak of TPUs and NVIDIA GPUs
(PEAK_BF16_FLOPS), or on CPU a matmul rate measured once per run.

After a resume from step S the rows a killed run wrote past S are dropped from metrics.jsonl and purged for
TensorBoard (its `purge_step`), so readers see exactly one row per (step, split).

On gs:// nothing can be appended to: metrics.jsonl is kept in memory and the whole object is rewritten at most
every UPLOAD_EVERY_S seconds, before every checkpoint (`flush()`) and at the end, so a killed run loses only rows
past its last checkpoint, which a resume would drop anyway. TensorBoard writes gs:// itself (tensorboardX's
google-cloud-storage writer, which likewise rewrites its event object on each flush).
"""

from __future__ import annotations

import datetime
import json
import math
import secrets
import sys
import time

import jax
import tqdm
from tensorboardX import SummaryWriter

from effjax import paths

UPLOAD_EVERY_S = 30.0

# Dense bf16 peak FLOP/s per JAX device, by the first matching substring of the lower-cased device_kind
# ('TPU v5 lite' is v5e, 'TPU v5' alone v5p, 'TPU v6 lite' v6e; a v4/v5p device is one megacore chip).
PEAK_BF16_FLOPS = (
  ('tpu v4', 275e12),
  ('tpu v5 lite', 197e12),
  ('tpu v5e', 197e12),
  ('tpu v5p', 459e12),
  ('tpu v5', 459e12),
  ('tpu v6 lite', 918e12),
  ('tpu v6e', 918e12),
  ('a100', 312e12),
  ('h100 pcie', 756e12),
  ('h100 nvl', 835e12),
  ('h100', 989e12),
  ('h200', 989e12),
)

_measured_cpu_peak = None


def peak_of_kind(device_kind: str) -> float | None:
  kind = device_kind.lower()
  return next((flops for key, flops in PEAK_BF16_FLOPS if key in kind), None)


def cpu_peak_flops() -> float:
  """This host's f32 matmul rate, measured once per process (a jitted 1024² matmul, best of 5: ~50 ms)."""
  global _measured_cpu_peak  # pylint: disable=global-statement
  if _measured_cpu_peak is None:
    n = 1024
    x = jax.device_put(jax.numpy.ones((n, n), jax.numpy.float32), jax.local_devices(backend='cpu')[0])
    matmul = jax.jit(lambda a: a @ a)
    matmul(x).block_until_ready()
    best = math.inf
    for _ in range(5):
      tick = time.perf_counter()
      matmul(x).block_until_ready()
      best = min(best, time.perf_counter() - tick)
    _measured_cpu_peak = 2 * n**3 / best
  return _measured_cpu_peak


def peak_flops(devices) -> float | None:
  """Peak FLOP/s of the run's devices together; None for an accelerator the table does not know (no MFU)."""
  devices = list(devices)
  if devices[0].platform == 'cpu':  # virtual CPU devices share the host's cores: the host's rate, per process
    return cpu_peak_flops() * jax.process_count()
  peak = peak_of_kind(devices[0].device_kind)
  return peak * len(devices) if peak else None


class StepClock:
  """Seconds spent in train steps only. The loop counts each step and pauses the clock (right after a device
  sync) around whatever is not a train step; `rates()` reports the window since its last call."""

  def __init__(self, tokens_per_step: int, flops_per_step: float, peak: float | None):
    self.tokens_per_step, self.flops_per_step, self.peak = tokens_per_step, flops_per_step, peak
    self._since = None
    self._running_steps = 0
    self.seconds, self.steps = 0.0, 0

  def resume(self) -> None:
    if self._since is None:
      self._since, self._running_steps = time.perf_counter(), 0

  def count(self) -> None:
    if self._since is not None:
      self._running_steps += 1

  def pause(self) -> None:
    if self._since is not None:
      self.seconds += time.perf_counter() - self._since
      self.steps += self._running_steps
      self._since = None

  def rates(self) -> dict:
    if not self.steps:
      return {'step_time': None, 'tokens_per_sec': None, 'mfu': None}
    step_time = self.seconds / self.steps
    self.seconds, self.steps = 0.0, 0
    mfu = self.flops_per_step / step_time / self.peak if self.peak else None
    return {'step_time': step_time, 'tokens_per_sec': self.tokens_per_step / step_time, 'mfu': mfu}


class MetricsWriter:
  """Appends metrics; only process 0 writes, so multi-host runs produce one log.

  `progress`: a bar when stdout is a terminal; otherwise (or with progress=False) one plain line per train log
  step and per evaluation, flushed at once.
  """

  def __init__(
    self,
    workdir: str,
    total_steps: int,
    initial_step: int = 0,
    progress: bool = True,
    wandb_project: str = '',
    run_config: dict | None = None,
  ):
    self.active = jax.process_index() == 0
    self.total_steps = total_steps
    self._jsonl = self._tb = self._bar = self._wandb = None
    if self.active:
      if wandb_project:
        self._wandb = WandbRun(workdir, wandb_project, run_config or {})
      path = paths.join(workdir, 'metrics.jsonl')
      drop_rows_after(path, initial_step)
      self._jsonl = open(path, 'a', encoding='utf-8') if not paths.is_remote(path) else RewrittenObject(path)
      self._tb = SummaryWriter(paths.join(workdir, 'tb'), purge_step=initial_step + 1 if initial_step else None)
      if progress and sys.stdout.isatty():
        self._bar = tqdm.tqdm(total=total_steps, initial=initial_step, unit='step', dynamic_ncols=True, file=sys.stdout)

  def write(self, step: int, split: str, values: dict) -> None:
    if not self.active:
      return
    record = {'step': int(step), 'split': split, **{k: _plain(v) for k, v in values.items()}}
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()
    for key, value in record.items():
      if key not in ('step', 'split') and isinstance(value, (int, float)):
        self._tb.add_scalar(f'{split}/{key}', value, step)
    if self._wandb is not None:
      self._wandb.log(step, split, record)
    if self._bar is None:
      print(format_line(record, self.total_steps), flush=True)
    elif split == 'train':  # the bar's `loss` is always the train loss
      self._bar.set_postfix({'loss': f'{record["loss"]:.4g}', **_rate_postfix(record)}, refresh=False)
    else:
      self._bar.write(format_line(record, self.total_steps), file=sys.stdout)

  def flush(self) -> None:
    """On gs://, metrics.jsonl as written so far is uploaded (called before each checkpoint). A local file is
    already flushed line by line: nothing to do."""
    if self.active and isinstance(self._jsonl, RewrittenObject):
      self._jsonl.flush(force=True)

  def advance(self, steps: int = 1) -> None:
    if self._bar is not None:
      self._bar.update(steps)

  def close(self) -> None:
    if self.active:
      self._jsonl.close()
      self._tb.close()
      if self._bar is not None:
        self._bar.close()
      if self._wandb is not None:
        self._wandb.close()


class RewrittenObject:
  """An append-only text file on an object store: the lines are kept and the object rewritten whole, at most
  every UPLOAD_EVERY_S seconds (plus forced flushes and close)."""

  def __init__(self, path: str):
    self.path = path
    self._text = paths.read_text(path) if paths.exists(path) else ''
    self._uploaded = time.monotonic()
    self._dirty = False

  def write(self, text: str) -> None:
    self._text += text
    self._dirty = True

  def flush(self, force: bool = False) -> None:
    if self._dirty and (force or time.monotonic() - self._uploaded >= UPLOAD_EVERY_S):
      paths.write_text_atomic(self.path, self._text)
      self._uploaded, self._dirty = time.monotonic(), False

  def close(self) -> None:
    self.flush(force=True)


class WandbRun:
  """The same rows in a Weights & Biases run (train.wandb_project; `pip install 'effjax[wandb]'`). The run id is
  kept in DIR/wandb_run_id, so a resumed run continues its W&B run; WANDB_MODE=offline writes under DIR/wandb.
  W&B keeps steps increasing: after a resume from an older checkpoint it keeps the rows it already had."""

  def __init__(self, workdir: str, project: str, run_config: dict):
    import wandb  # pylint: disable=import-outside-toplevel  (an optional extra: checked by check_wandb)

    id_path = paths.join(workdir, 'wandb_run_id')
    if paths.exists(id_path):
      run_id = paths.read_text(id_path).strip()
    else:
      run_id = secrets.token_hex(4)
      paths.write_text_atomic(id_path, run_id)
    # W&B keeps its files on a local disk: under the workdir when it is one, else wandb's default (./wandb).
    self._run = wandb.init(
      project=project, id=run_id, resume='allow', dir=None if paths.is_remote(workdir) else workdir, config=run_config
    )

  def log(self, step: int, split: str, record: dict) -> None:
    self._run.log(
      {f'{split}/{k}': v for k, v in record.items() if k not in ('step', 'split') and isinstance(v, (int, float))},
      step=step,
    )

  def close(self) -> None:
    self._run.finish()


def check_wandb(project: str) -> None:
  """train.wandb_project needs the wandb extra: say so before the run writes anything."""
  if not project:
    return
  try:
    import wandb  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    from effjax.errors import EffjaxError  # pylint: disable=import-outside-toplevel

    raise EffjaxError(
      f"train.wandb_project={project!r} needs the wandb package: pip install 'effjax[wandb]' "
      '(or leave train.wandb_project empty)'
    ) from None


def _rate_postfix(record: dict) -> dict:
  out = {}
  if record.get('tokens_per_sec') is not None:
    out['tok/s'] = f'{record["tokens_per_sec"]:,.0f}'
  if record.get('mfu') is not None:
    out['mfu'] = f'{100 * record["mfu"]:.1f}%'
  return out


def format_line(record: dict, total_steps: int) -> str:
  """`step 100/1200  train loss 2.3456  lr 1.00e-03  28.1 ms/step  4,552 tok/s  MFU 3.1%  ETA 0:00:31`."""
  step, split = record['step'], record['split']
  parts = [f'step {step}/{total_steps}', f'{split} loss {record["loss"]:.4f}']
  if split == 'train':
    parts.append(f'lr {record["lr"]:.2e}')
    if record.get('step_time') is not None:
      parts += [f'{1000 * record["step_time"]:.1f} ms/step', f'{record["tokens_per_sec"]:,.0f} tok/s']
      if record.get('mfu') is not None:
        parts.append(f'MFU {100 * record["mfu"]:.1f}%')
      eta = round(record['step_time'] * max(total_steps - step, 0))
      parts.append(f'ETA {datetime.timedelta(seconds=eta)}')
  else:
    parts += [f'{k} {record[k]:.4g}' for k in ('ppl', 'bpb') if k in record]
  return '  '.join(parts)


def drop_rows_after(path: str, step: int) -> None:
  """Rows of steps after `step` (written by a run killed after its last checkpoint) would be written again by
  the resumed run: remove them, rewriting the file atomically."""
  if not paths.exists(path):
    return
  lines = [line for line in paths.read_text(path).splitlines(keepends=True) if line.strip()]
  kept = [line for line in lines if _row_step(line) <= step]
  if len(kept) == len(lines):
    return
  paths.write_text_atomic(path, ''.join(kept))


def _row_step(line: str) -> float:
  """A row's step; a line cut short by a kill (not valid JSON) counts as after every step."""
  try:
    return json.loads(line)['step']
  except (ValueError, KeyError, TypeError):
    return math.inf


def _plain(value):
  if hasattr(value, 'item'):
    value = value.item()
  return value


def read_metrics(workdir: str) -> list[dict]:
  path = paths.join(workdir, 'metrics.jsonl')
  if not paths.exists(path):
    return []
  out = []
  for line in paths.read_text(path).splitlines():
    try:
      out.append(json.loads(line))
    except ValueError:  # blank, or cut short by a full disk or a kill: not a record
      continue
  return out
