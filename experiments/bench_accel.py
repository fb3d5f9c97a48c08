"""Accelerator benchmark: training throughput and MFU of GPT-124M (configs/gpt.py:paper) on one GPU.

    python -m experiments.bench_accel                      # on a GPU machine: bf16, cuDNN attention, seq 1024
    python -m experiments.bench_accel --batch=32 --remat=dots_saveable --attention=xla
    python -m experiments.bench_accel --smoke              # anywhere (CPU): a tiny model through the same code

It times the real jitted train step (experiments.bench_train.time_train_step: the step train.py runs, AdamW
included) on synthetic tokens, with model.dtype=bfloat16 (f32 params and optimizer state, bf16 matmuls) and
model.attention_impl='cudnn' (jax.nn.dot_product_attention's cuDNN flash attention) by default. Before compiling
it prints effjax.memory's per-device plan for the chosen batch.

MFU = model FLOPs/s / peak FLOP/s, with model FLOPs = 3 x forward FLOPs per token (effjax.accounting: every
matmul, attention over the full context 4·S·D per layer as in PaLM's MFU, the tied output head) x tokens/s. Two
denominators are reported: the peak of a bf16 matmul measured in the same run (8192³ on GPU: what this chip
really reaches, clocks and power included) and the published dense bf16 peak of the detected GPU (e.g. H100 SXM
989 TFLOP/s; no sparsity) -- MFU against the published peak is the figure papers quote.

NO GPU WAS AVAILABLE WHEN THIS SCRIPT WAS WRITTEN: only `--smoke` has been run (on CPU). The GPU numbers, and
whether the cuDNN path and the default batch behave as intended on real hardware, have NOT been measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp

from effjax.configs import gpt as gpt_config
from effjax import accounting, memory
from experiments.bench_train import peak_matmul_flops, time_train_step

# Published dense (non-sparse) bf16 tensor-core peaks, FLOP/s, by a substring of jax's device_kind.
PUBLISHED_BF16_PEAK = [
  ('H100 PCIe', 756e12),
  ('H100 NVL', 835e12),
  ('H100', 989.4e12),  # SXM5
  ('H200', 989.4e12),
  ('GH200', 989.4e12),
  ('B200', 2250e12),
  ('A100', 312e12),
  ('L40S', 362e12),
  ('L4', 121e12),
  ('A10G', 70e12),
  ('V100', 125e12),  # fp16 tensor cores (no bf16)
]
SMOKE_NOTE = (
  'SMOKE RUN ON CPU: a tiny model through the same code path. This is NOT an accelerator '
  'measurement; the GPU MFU of GPT-124M was not measured here.'
)


def published_peak(device_kind: str) -> float | None:
  for name, peak in PUBLISHED_BF16_PEAK:
    if name.lower() in device_kind.lower():
      return peak
  return None


def bench_config(args):
  if args.smoke:
    c = gpt_config.get_config('tiny')
    c.model.update(vocab_size=256, max_len=args.seq or 64)
    c.data.seq_len = args.seq or 64
    c.train.batch_size = args.batch or 8
  else:
    c = gpt_config.get_config('paper')
    c.data.seq_len = args.seq or 1024
    c.train.batch_size = args.batch or 16
  c.model.update(dtype=args.dtype, remat=args.remat, attention_impl=args.attention, dropout=0.0, attn_dropout=0.0)
  c.mesh.update(data=1, fsdp=1, tensor=1)
  return c


def report(out: dict, kind: str, n: int, published, smoke: bool) -> None:
  """The result in words, on stdout."""
  print(f'step {out["step_ms"]:.1f} ms, {out["tokens_per_sec"]:,.0f} tokens/s, compile {out["compile_s"]:.1f} s')
  print(
    f'model FLOP/s {out["model_flops_per_sec"] / 1e12:.3f} T (3 x forward incl. attention); 6N FLOP/s '
    f'{out["six_n_flops_per_sec"] / 1e12:.3f} T'
  )
  print(
    f'measured peak: bf16 matmul {n}^3 {out["measured_peak_bf16_matmul_flops"] / 1e12:.3f} TFLOP/s, '
    f'f32 {out["measured_peak_f32_matmul_flops"] / 1e12:.3f} TFLOP/s'
  )
  print(f'MFU vs measured bf16 peak: {out["mfu_vs_measured_bf16_peak"]:.1%}')
  if published:
    print(
      f'published dense bf16 peak of {kind}: {published / 1e12:.1f} TFLOP/s -> MFU {out["mfu_vs_published_peak"]:.1%}'
    )
  else:
    print(
      'published peak: not applicable (no GPU detected)'
      if out['backend'] != 'gpu'
      else f'published peak: unknown for {kind!r} (add it to PUBLISHED_BF16_PEAK)'
    )
  if smoke:
    print(SMOKE_NOTE)


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--smoke', action='store_true', help='tiny model on whatever backend (CPU): checks the code')
  parser.add_argument('--batch', type=int, default=0, help='sequences per step (default 16; smoke 8)')
  parser.add_argument('--seq', type=int, default=0, help='tokens per sequence (default 1024; smoke 64)')
  parser.add_argument('--dtype', default='bfloat16', choices=['bfloat16', 'float32'])
  parser.add_argument('--remat', default='none', choices=['none', 'full', 'dots_saveable'])
  parser.add_argument(
    '--attention', default='', choices=['', 'xla', 'cudnn'], help='default: cudnn on GPU, xla elsewhere'
  )
  parser.add_argument('--steps', type=int, default=0, help='timed steps (default 20; smoke 3)')
  parser.add_argument('--out', default='', help='write the result as JSON here')
  return parser.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)

  backend = jax.default_backend()
  if backend != 'gpu' and not args.smoke:
    print(
      f'bench_accel: error: no GPU here (backend {backend!r}); this benchmark measures one GPU. Use --smoke '
      'to check the code path on CPU.',
      file=sys.stderr,
    )
    sys.exit(2)
  args.attention = args.attention or ('cudnn' if backend == 'gpu' else 'xla')
  config = bench_config(args)
  device = jax.devices()[0]
  kind = getattr(device, 'device_kind', backend)
  print(
    f'device: {kind} ({backend}); GPT {config.model.num_layers}L/{config.model.d_model}d, '
    f'{accounting.param_counts(config.model)["total_params"]:,} params; batch {config.train.batch_size} x '
    f'seq {config.data.seq_len}; dtype {config.model.dtype}, remat {config.model.remat}, attention '
    f'{config.model.attention_impl}'
  )
  if args.smoke:
    print(SMOKE_NOTE)

  plan = memory.plan(config, 1)
  print(
    f'memory plan (effjax.memory): {plan["total_bytes"] / 2**30:.2f} GiB per device '
    f'(activations {plan["activation_bytes"] / 2**30:.2f} GiB)'
  )

  n = 1024 if args.smoke else 8192
  peak_bf16 = peak_matmul_flops(n, dtype=jnp.bfloat16)
  peak_f32 = peak_matmul_flops(n, dtype=jnp.float32)
  published = published_peak(kind) if backend == 'gpu' else None

  result = time_train_step(config, steps=args.steps or (3 if args.smoke else 20), warmup=1 if args.smoke else 3)
  achieved = result['model_flops_per_sec']
  n_params = accounting.param_counts(config.model)['non_embedding_trainable_params']
  tokens_per_s = result['tokens_per_sec']
  out = {
    'smoke': bool(args.smoke),
    'backend': backend,
    'device_kind': kind,
    'config': {
      'layers': config.model.num_layers,
      'd_model': config.model.d_model,
      'batch': config.train.batch_size,
      'seq_len': config.data.seq_len,
      'dtype': config.model.dtype,
      'remat': config.model.remat,
      'attention_impl': config.model.attention_impl,
    },
    **result,
    'six_n_flops_per_sec': 6 * n_params * tokens_per_s,
    'measured_peak_bf16_matmul_flops': peak_bf16,
    'measured_peak_f32_matmul_flops': peak_f32,
    'published_peak_bf16_flops': published,
    'mfu_vs_measured_bf16_peak': achieved / peak_bf16,
    'mfu_vs_published_peak': achieved / published if published else None,
    'memory_plan_bytes': plan['total_bytes'],
  }
  report(out, kind, n, published, args.smoke)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w', encoding='utf-8') as f:
      json.dump(out, f, indent=2)
  return out


if __name__ == '__main__':
  main()
