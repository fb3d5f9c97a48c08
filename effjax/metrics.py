"""Run metrics: metrics.jsonl (one JSON object per line), TensorBoard events, and a progress bar."""
from __future__ import annotations

import json
import os

import jax
import tqdm
from tensorboardX import SummaryWriter


class MetricsWriter:
  """Appends metrics; only process 0 writes, so multi-host runs produce one log."""

  def __init__(self, workdir: str, total_steps: int, initial_step: int = 0, progress: bool = True):
    self.active = jax.process_index() == 0
    self._jsonl = self._tb = self._bar = None
    if self.active:
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a', encoding='utf-8')
      self._tb = SummaryWriter(os.path.join(workdir, 'tb'))
      if progress:
        self._bar = tqdm.tqdm(total=total_steps, initial=initial_step, unit='step', dynamic_ncols=True)

  def write(self, step: int, split: str, values: dict) -> None:
    if not self.active:
      return
    record = {'step': int(step), 'split': split, **{k: _plain(v) for k, v in values.items()}}
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()
    for key, value in record.items():
      if key not in ('step', 'split') and isinstance(value, (int, float)):
        self._tb.add_scalar(f'{split}/{key}', value, step)
    if self._bar is not None:
      self._bar.set_postfix({k: f'{record[k]:.4g}' for k in ('loss', 'tokens_per_sec') if k in record},
                            refresh=False)

  def advance(self, steps: int = 1) -> None:
    if self._bar is not None:
      self._bar.update(steps)

  def close(self) -> None:
    if self.active:
      self._jsonl.close()
      self._tb.close()
      if self._bar is not None:
        self._bar.close()


def _plain(value):
  if hasattr(value, 'item'):
    value = value.item()
  return value


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]
