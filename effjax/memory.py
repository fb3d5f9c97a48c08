"""Per-device memory of a training run, planned before launching it: `--mode=memory`.

    python -m effjax.main --mode=memory --config=configs/gpt.py:medium --accelerator=v4-8
    python -m effjax.main --mode=memory --config=configs/gpt.py:medium --accelerator=h100 --config.model.remat=full
    python -m effjax.main --mode=memory --config=configs/gpt.py:paper --devices=8 --config.mesh.fsdp=-1

Nothing is allocated and no accelerator is needed: the model is built with `jax.eval_shape`, its parameters'
logical axis names go through `config.mesh.rules` onto a `jax.sharding.AbstractMesh` of the asked-for size
(`--devices=N`, or the device count of `--accelerator`, else the devices this process sees), exactly as
`state.make_setup` does for a real mesh, and the bytes are counted per device:

  params       Σ over parameters of the per-device shard (shape / mesh axes of its spec) × param dtype
  frozen       the same for non-trained collections (doped layers' frozen weights, constants)
  grads        like params (they are constrained to the params' layout: reduce-scattered under FSDP);
               × 2 with train.grad_accum > 1 (the accumulator and one micro-batch's gradients)
  optimizer    the optimizer state's leaves laid out like their params (Adam: μ and ν, 2 × params) + scalars
  gathered     FSDP only: one block's weights all-gathered for its matmuls, in the forward and again in the
               backward (with their gradient before the reduce-scatter): 2 × block params / tensor × bytes
  activations  what the backward pass keeps, an estimate (below)

Activation estimate (per device). b = batch_size / grad_accum / (devices the batch is split over) rows of T =
seq_len tokens, a = bytes of model.dtype, t = tensor-parallel size (only where it divides heads / MLP / vocab).
Per token and per block of width D, N heads, MLP width F, the backward keeps
  none           4·D·a (residual stream, both norm outputs)  +  (4·D + 2·F)·a / t (q, k, v, attention output,
                 MLP pre- and post-GELU)  +  N·T·(4 + a) / t (the XLA path's T×T attention probabilities in f32
                 and in a; 'cudnn' flash attention keeps only N·4 bytes of log-sum-exp instead)
                 + dropout masks: (2·D + F/t) bytes if model.dropout > 0, N·T·(1 + a)/t if model.attn_dropout > 0
  dots_saveable  only matmul outputs: (2·D + (4·D + F)/t)·a + N·T·a/t (QKᵀ), + the block input D·a
  full           only the block input D·a
and with remat, what one block recomputes in the backward ('none' minus what it kept) is live again. Frozen MLPs
(doping) keep 2·D·a + 2·F'·a per token, and families with blocks of several widths (models.Family.memory_blocks)
use each one's own width.
Outside the blocks: the embedding output and final norm 2·D·a, and the loss: f32 logits, their log-softmax and
the compute-dtype logits, V·(8 + a)/t per token. Total = b·T·(Σ blocks + outside).

The per-block terms are the activation accounting of Korthikanti et al. 2022 ("Reducing Activation Recomputation in
Large Transformer Models": 34·s·b·h + 5·a·s²·b bytes per layer in fp16 with dropout) for this block. It is a
planning estimate, not a measurement: it was checked only against XLA:CPU here (no accelerator), where the
compiled train step's temporaries are ~2x the 'none' estimate (XLA:CPU computes bf16 in f32 and keeps elementwise
intermediates such as GELU's and LayerNorm's that GPU/TPU fusions recompute) and ~1.5x the 'full' one; the order
none > dots_saveable > full holds there too. Real runs add the compiled program, collectives' buffers and allocator
fragmentation: keep some headroom (the verdict says "tight" under 15%). On GPU, JAX preallocates
XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.75) of the memory, so that fraction is what a run can use: the verdict
compares against it (launch/README.md: set it to 0.9 on a dedicated GPU).
"""

from __future__ import annotations

import math
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AbstractMesh, PartitionSpec as P

from effjax import optim, sharding, state
from effjax.errors import EffjaxError
from effjax.models import family

GiB = 2**30

# Accelerator name -> (HBM GiB per JAX device, kind). TPU type names count TensorCores for v2-v4/v5p (2 per chip,
# one JAX device per chip from v4 on) and chips for v5e/v6e; GPUs are 'h100', '8xh100', ...
TPU_HBM = {'v2': 8, 'v3': 16, 'v4': 32, 'v5p': 95, 'v5litepod': 16, 'v5e': 16, 'v6e': 32}
GPU_HBM = {'h100': 80, 'h200': 141, 'a100': 80, 'a100-40g': 40, 'l4': 24, 'b200': 180}


def parse_accelerator(name: str) -> tuple[int, float, str]:
  """(JAX devices, HBM GiB per device, 'tpu' | 'gpu') of a name such as v4-8, v5litepod-16, h100, 8xh100."""
  name = name.strip().lower()
  m = re.fullmatch(r'(v2|v3|v4|v5p|v5litepod|v5e|v6e)-(\d+)', name)
  if m:
    kind, n = m.group(1), int(m.group(2))
    per_chip_devices = 2 if kind in ('v2', 'v3') else 1  # v2/v3: one device per TensorCore
    cores_per_chip = 2 if kind in ('v2', 'v3', 'v4', 'v5p') else 1
    devices = n // cores_per_chip * per_chip_devices
    if devices < 1:
      raise EffjaxError(f'--accelerator={name!r} has no whole chip; e.g. v4-8, v5litepod-8, v6e-8')
    return devices, float(TPU_HBM[kind]), 'tpu'
  m = re.fullmatch(r'(?:(\d+)x)?([a-z0-9-]+)', name)
  if m and m.group(2) in GPU_HBM:
    return int(m.group(1) or 1), float(GPU_HBM[m.group(2)]), 'gpu'
  raise EffjaxError(
    f'--accelerator={name!r} is unknown; use a TPU type ({", ".join(f"{k}-N" for k in TPU_HBM)}, '
    f'e.g. v4-8) or a GPU ({", ".join(GPU_HBM)}, optionally Nx, e.g. 8xh100)'
  )


def usable_fraction(kind: str) -> float:
  if kind == 'gpu':
    return float(os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION', 0.75))
  return 1.0


def _abstract_mesh(mesh_config, num_devices: int) -> AbstractMesh:
  return AbstractMesh(sharding.mesh_shape(mesh_config, num_devices), sharding.AXES)


def _shard_bytes(abstract, specs, mesh) -> int:
  leaves = jax.tree.leaves(abstract)
  spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
  return int(
    sum(
      math.prod(sharding.shard_shape(x.shape, s, mesh)) * np.dtype(x.dtype).itemsize
      for x, s in zip(leaves, spec_leaves)
    )
  )


def _bytes(tree) -> int:
  return int(sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def _divides(t: int, dim: int) -> int:
  return t if t > 1 and dim % t == 0 else 1


def _blocks(cfg) -> list[tuple[str, int, int, int]]:
  """(kind, width, heads, applications) of every layer the forward runs: 'block' transformer blocks and
  'frozen' doped MLPs, as the family declares them (models.Family.memory_blocks)."""
  return family(cfg.family).memory_blocks(cfg)


def activation_bytes_per_token(cfg, seq_len: int, tensor: int = 1) -> dict:
  """Bytes per token the backward keeps, by part (see the module docstring for the formula)."""
  a = np.dtype(jnp.dtype(cfg.dtype)).itemsize
  remat, cudnn = cfg.remat, cfg.attention_impl == 'cudnn'
  blocks, recompute = 0.0, 0.0
  for kind, d, n, count in _blocks(cfg):
    f = cfg.mlp_ratio * d
    if kind == 'frozen':
      ff = cfg.doping.frozen_mlp_ratio * d
      full = 2 * d * a + 2 * ff * a / _divides(tensor, ff)
      saved = full if remat == 'none' else d * a
      blocks += count * saved
      recompute = max(recompute, full - saved)
      continue
    th, tf = _divides(tensor, d), _divides(tensor, f)
    tn = _divides(tensor, n)
    scores = n * 4 if cudnn else n * seq_len * (4 + a) / tn
    full = 4 * d * a + 4 * d * a / th + 2 * f * a / tf + scores
    if cfg.dropout > 0:
      full += 2 * d + f / tf
    if cfg.attn_dropout > 0:
      full += n * seq_len * (1 + a) / tn
    if remat == 'none':
      saved = full
    elif remat == 'full':
      saved = d * a
    else:  # dots_saveable (and dots_with_no_batch_dims_saveable, counted the same)
      saved = d * a + (2 * d + (4 * d + f) / max(th, tf)) * a + (0 if cudnn else n * seq_len * a / tn)
    blocks += count * saved
    recompute = max(recompute, full - saved)
  extra = family(cfg.family).memory_extra_bytes
  if extra is not None:  # e.g. parallel branches' outputs before they are mixed
    blocks += extra(cfg, a)
  outside = 2 * cfg.d_model * a + cfg.vocab_size * (8 + a) / _divides(tensor, cfg.vocab_size)
  return {'blocks': blocks, 'recompute': recompute, 'outside': outside}


def _gathered_layer_bytes(model_cfg, params, mesh) -> int:
  """Under FSDP a block's weights are all-gathered before use: about two blocks' worth (this one and the next,
  prefetched) is held whole (1/tensor of it with tensor parallelism)."""
  if mesh.shape['fsdp'] <= 1:
    return 0
  blocks = sum(count for kind_, *_, count in _blocks(model_cfg) if kind_ == 'block')
  outside = family(model_cfg.family).outside_params
  stack_params = {k: v for k, v in params.items() if k not in outside}
  distinct = (
    blocks if model_cfg.share_layers == 'none' else {'all': 1, 'groups': model_cfg.num_groups}[model_cfg.share_layers]
  )
  per_block = _bytes(stack_params) / max(distinct, 1)
  return int(2 * per_block / mesh.shape['tensor'])


def plan(config, num_devices: int | None = None, hbm_gib: float | None = None, kind: str = '') -> dict:
  """Per-device bytes of params, grads, optimizer state and activations for `config` on `num_devices`."""
  num_devices = num_devices or jax.device_count()
  model_cfg = config.model
  mesh = _abstract_mesh(config.mesh, num_devices)
  rules = sharding.rules(config.mesh)
  _, boxed = state.abstract_model(model_cfg)
  boxed_params, boxed_extra = boxed['params'], {k: v for k, v in boxed.items() if k != 'params'}
  param_specs = sharding.logical_specs(boxed_params, mesh, rules)
  extra_specs = sharding.logical_specs(boxed_extra, mesh, rules)
  params, extra = nn.unbox(boxed_params), nn.unbox(boxed_extra)
  optimizer = optim.make_optimizer(config.train)
  opt_state = jax.eval_shape(optimizer.init, params)
  replicated = P()
  opt_specs = optax.tree_map_params(
    optimizer,
    lambda _, s: s,
    opt_state,
    param_specs,
    transform_non_params=lambda _: replicated,
    is_leaf=lambda x: isinstance(x, P),
  )

  t = config.train
  param_bytes = _shard_bytes(params, param_specs, mesh)
  grad_bytes = param_bytes * (2 if t.grad_accum > 1 else 1)
  opt_bytes = _shard_bytes(opt_state, opt_specs, mesh)
  extra_bytes = _shard_bytes(extra, extra_specs, mesh)

  batch_spec = nn.logical_to_mesh(P('batch', None), rules)[0]
  batch_axes = (batch_spec,) if isinstance(batch_spec, str) else tuple(batch_spec or ())
  batch_shards = math.prod(mesh.shape[a] for a in batch_axes)
  rows = t.batch_size / t.grad_accum / batch_shards
  tokens_per_device = rows * config.data.seq_len
  tensor = mesh.shape['tensor']
  per_token = activation_bytes_per_token(model_cfg, config.data.seq_len, tensor)
  activation_bytes = int(tokens_per_device * sum(per_token.values()))

  gathered = _gathered_layer_bytes(model_cfg, params, mesh)

  total = param_bytes + extra_bytes + grad_bytes + opt_bytes + gathered + activation_bytes
  out = {
    'devices': num_devices,
    'mesh': dict(mesh.shape),
    'rows_per_device': rows,
    'tokens_per_device': int(tokens_per_device),
    'param_dtype': model_cfg.param_dtype,
    'compute_dtype': model_cfg.dtype,
    'remat': model_cfg.remat,
    'attention_impl': model_cfg.attention_impl,
    'total_param_bytes': _bytes(params) + _bytes(extra),
    'param_bytes': param_bytes,
    'frozen_bytes': extra_bytes,
    'grad_bytes': grad_bytes,
    'optimizer_bytes': opt_bytes,
    'gathered_layer_bytes': gathered,
    'activation_bytes': activation_bytes,
    'activation_bytes_per_token': {k: round(v, 1) for k, v in per_token.items()},
    'total_bytes': total,
  }
  if hbm_gib:
    usable = hbm_gib * GiB * usable_fraction(kind)
    out.update(hbm_bytes=int(hbm_gib * GiB), usable_bytes=int(usable), fits=bool(total <= usable))
  return out


def format_plan(p: dict, accelerator: str = '') -> str:
  g = lambda b: f'{b / GiB:9.3f} GiB' if b >= GiB / 10 else f'{b / 2**20:9.3f} MiB'
  mesh = ' x '.join(f'{k}={v}' for k, v in p['mesh'].items())
  where = f' ({accelerator})' if accelerator else ''
  lines = [
    f'per-device memory on {p["devices"]} device(s){where}, mesh {mesh}; {p["rows_per_device"]:g} rows '
    f'({p["tokens_per_device"]:,} tokens) per device per micro-batch; params {p["param_dtype"]}, compute '
    f'{p["compute_dtype"]}, remat={p["remat"]}, attention={p["attention_impl"]}'
  ]
  for key in (
    'param_bytes',
    'frozen_bytes',
    'grad_bytes',
    'optimizer_bytes',
    'gathered_layer_bytes',
    'activation_bytes',
    'total_bytes',
  ):
    lines.append(f'  {key[:-6]:<16}{g(p[key])}')
  if 'hbm_bytes' in p:
    headroom = 1 - p['total_bytes'] / p['usable_bytes']
    verdict = (
      'does NOT fit'
      if not p['fits']
      else f'fits, but tight ({headroom:.0%} headroom)'
      if headroom < 0.15
      else f'fits ({headroom:.0%} headroom)'
    )
    lines.append(
      f'  {"usable HBM":<16}{g(p["usable_bytes"])}  (of {p["hbm_bytes"] / GiB:g} GiB per device)  -> {verdict}'
    )
    if headroom < 0.15:
      tips = [] if p['remat'] == 'full' else ['--config.model.remat=full (or dots_saveable)']
      tips += ['--config.train.grad_accum=K (activations / K)', 'more FSDP (--config.mesh.fsdp=-1) or devices']
      if p['compute_dtype'] == 'float32':
        tips.append('--config.model.dtype=bfloat16')
      lines.append('  try: ' + '; '.join(tips))
  lines.append('  (estimate: see effjax/memory.py for the formula; XLA temporaries and fragmentation come on top)')
  return '\n'.join(lines)
