"""Where and how a results file was made: the fields every experiment's `meta` shares, so that each results file
names its command, its scale and the machine state it ran in (jax, device, CPUs, load before and after)."""

from __future__ import annotations

import os
import time

import jax


def run_meta(command: str, steps: int, tokens_per_step: int, scale: str, load_before, t0: float, **extra) -> dict:
  """`load_before` is os.getloadavg() and `t0` time.time() at the start of the command; `extra` is appended."""
  return dict(
    command=command,
    steps=steps,
    tokens_per_step=tokens_per_step,
    scale=scale,
    jax=jax.__version__,
    device=str(jax.devices()[0]),
    cpus=os.cpu_count(),
    loadavg_before=load_before,
    loadavg_after=os.getloadavg(),
    total_wall_s=time.time() - t0,
    **extra,
  )
