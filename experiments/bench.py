"""The effjax benchmark suite: `python -m experiments.bench [--only train,torch,compile,structured,sample,memory]`.

Sub-benchmarks (each runs in its own subprocess, so its peak RSS is its own and XLA state never leaks between them):
  train       training tokens/s and MFU of every family (gpt, efficio, pgpt, lcgpt, ccgpt, doped, fastfood,
              blockdiag) at two sizes, all candidates timed in interleaved rounds together with the peak matmul.
  torch       effjax's GPT vs the PyTorch reference (experiments/torch_gpt.py: same config, same batch, AdamW step
              included, torch.set_num_threads(cores)) at the same two sizes, interleaved step by step, with the
              jitted peak matmul timed in the same rounds; ratios come from one run. torch.compile is added
              unless --no-torch_compile.
  compile     experiments/bench_compile.py (scanned / unrolled, shared 4 vs 48 layers).
  structured  experiments/bench_structured.py (FWHT, Adaptive FastFood and block-diagonal vs dense).
  sample      KV-cache vs no-cache sampling (effjax.sample.generate_cached / generate_uncached), tokens/s.
  memory      per family at the large size: peak RSS of a fresh process that compiles and runs two train steps,
              XLA's compiled memory analysis of the step, and effjax.memory.plan's estimate.

MFU = model FLOPs/s (3 x accounting.flops_per_token x tokens/s) / peak, where peak is the best jitted f32 2048^2
matmul FLOP/s measured in the same process in the same rounds. Two readings: `median` (median step / median peak)
and `best` (fastest step / fastest peak). The machine this was written on is a 2-core CPU shared with other jobs:
interleaving makes contention hit every candidate alike; the load average is recorded with every result.

Writes experiments/results/bench.json (sub-benchmarks run earlier are kept, so `--only` updates a part) and
bench.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

SUBS = ('train', 'torch', 'compile', 'structured', 'sample', 'memory')
SIZES = {  # name: (layers, d_model, heads, seq_len, batch)  -- experiments/bench_train.py's two sizes
  '4L-128d-ctx64-b12': (4, 128, 4, 64, 12),
  '6L-384d-ctx256-b16': (6, 384, 6, 256, 16),
}
QUICK_SIZES = {'2L-32d-ctx16-b4': (2, 32, 4, 16, 4)}  # --quick: tests and smoke runs
TARGET_SIZE = '6L-384d-ctx256-b16'


def family_overrides(family: str, d_model: int) -> dict:
  """model.* changes that turn the bench GPT into each family, at the same depth / width / context."""
  return {
    'gpt': {},
    'efficio': dict(share_layers='all', embed_dim=max(d_model // 4, 8)),
    'pgpt': dict(family='pgpt', pgpt=dict(num_branches=2, branch_input='split'), tie_embeddings=False, head_bias=True),
    'lcgpt': dict(
      family='lcgpt', compress=dict(compress_every=2, compress_factor=2), tie_embeddings=False, head_bias=True
    ),
    'ccgpt': dict(
      family='ccgpt',
      compress=dict(compress_every=2, compress_factor=2, conv_kernel=3),
      tie_embeddings=False,
      head_bias=True,
    ),
    'doped': dict(doping=dict(pattern='interleave', frozen_mlp_ratio=6)),
    'fastfood': dict(mlp_kind='fastfood'),
    'blockdiag': dict(mlp_kind='blockdiag', dense=dict(num_blocks=4)),
  }[family]


FAMILIES = ('gpt', 'efficio', 'pgpt', 'lcgpt', 'ccgpt', 'doped', 'fastfood', 'blockdiag')


def bench_config(family: str, size, **model_overrides):
  from experiments import bench_train  # pylint: disable=import-outside-toplevel

  layers, d, heads, seq, batch = size
  return bench_train.gpt_bench_config(
    layers, d, heads, seq, batch, **{**family_overrides(family, d), **model_overrides}
  )


def load_average() -> list[float]:
  return [round(x, 2) for x in os.getloadavg()]


def sizes_of(args) -> dict:
  return QUICK_SIZES if args.quick else SIZES


# ------------------------------------------------------------------------------------------ timing helpers
def start_jax_as_the_cli(config) -> None:
  """What `python -m effjax.main --mode=train` sets for itself before jax starts (effjax/runtime.py): huge pages
  (a re-exec) and, on CPU, one device per core unless XLA_FLAGS names a count (as tests do)."""
  from effjax import runtime  # pylint: disable=import-outside-toplevel

  runtime.reexec_with_hugepages()
  runtime.split_cpu_into_devices(config)


def run_devices(config) -> list:
  """The devices a training run of `config` uses: on CPU as many as effjax.sharding.cpu_device_count picks of those
  present (one per core once start_jax_as_the_cli ran), on an accelerator one."""
  import jax  # pylint: disable=import-outside-toplevel
  from effjax import sharding  # pylint: disable=import-outside-toplevel

  devices = jax.devices()
  if devices[0].platform != 'cpu':
    return devices[:1]
  return devices[: sharding.cpu_device_count(config, len(devices))]


def make_effjax_step(config):
  """(run-one-step callable, forward FLOPs per token, compile seconds) for the real jitted train step."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from effjax import accounting, state as state_lib, train  # pylint: disable=import-outside-toplevel

  setup = state_lib.make_setup(config, devices=run_devices(config))
  state = setup.init_fn(jax.random.key(0))
  b, t, v = config.train.batch_size, config.data.seq_len, config.model.vocab_size
  tokens = np.random.default_rng(0).integers(0, v, size=(b, t + 1), dtype=np.int32)
  batch = jax.device_put({'inputs': tokens[:, :-1], 'targets': tokens[:, 1:]}, setup.batch_sharding)
  t0 = time.perf_counter()
  compiled = train.make_train_step(setup, config).lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  box = [state]

  def run():
    box[0], metrics = compiled(box[0], batch)
    jax.block_until_ready(metrics)

  return run, accounting.flops_per_token(config.model, t), compile_s


def make_peak(n: int = 2048):
  """A callable returning the FLOP/s of jitted n x n f32 matmuls (best of 3 calls): one on one device using all
  cores, and, where jax has several CPU devices (one per core), one per device at once; the faster of the two,
  so that neither way of using the cores makes an MFU look higher than the machine allows."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=import-outside-toplevel

  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  f = jax.jit(lambda a, b: a @ b)
  cases = [(a, b, 2 * n**3)]
  devices = jax.devices()
  if len(devices) > 1:
    mesh = jax.make_mesh((len(devices),), ('d',), devices=devices)
    rows = jax.random.normal(jax.random.key(2), (len(devices) * n, n), jnp.float32)
    cases.append(
      (
        jax.device_put(rows, NamedSharding(mesh, PartitionSpec('d'))),
        jax.device_put(b, NamedSharding(mesh, PartitionSpec())),
        2 * len(devices) * n**3,
      )
    )
  for x, y, _ in cases:
    f(x, y).block_until_ready()

  def measure():
    rates = []
    for x, y, flops in cases:
      best = float('inf')
      for _ in range(3):
        t0 = time.perf_counter()
        f(x, y).block_until_ready()
        best = min(best, time.perf_counter() - t0)
      rates.append(flops / best)
    return max(rates)

  return measure


FAULTS = {}  # name -> minor page faults per call, from the last `interleave`


def interleave(cands: dict, rounds: int, warmup: int, peak=None, progress: str = '') -> tuple[dict, list]:
  """cands: name -> callable (one step). Returns name -> list of seconds per round, and peak FLOP/s per round."""
  for fn in cands.values():
    for _ in range(warmup):
      fn()
  times, peaks = {k: [] for k in cands}, []
  FAULTS.clear()
  start = time.time()
  for r in range(rounds):
    if peak is not None:
      peaks.append(peak())
    for name, fn in cands.items():
      f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
      FAULTS.setdefault(name, []).append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    done = time.time() - start
    print(
      f'  {progress}round {r + 1}/{rounds}  {done:.0f}s elapsed, ETA {done / (r + 1) * (rounds - r - 1):.0f}s, '
      f'load {load_average()[0]}',
      flush=True,
    )
  return times, peaks


def _med(xs):
  import numpy as np  # pylint: disable=import-outside-toplevel

  return float(np.median(xs))


# -------------------------------------------------------------------------------------------- sub-benchmarks
def run_train(args) -> dict:
  cands, meta = {}, {}
  families = args.families.split(',') if args.families else FAMILIES
  first = bench_config(families[0], next(iter(sizes_of(args).values())))
  start_jax_as_the_cli(first)  # the families are timed as the CLI runs them
  for size_name, size in sizes_of(args).items():
    for fam in families:
      config = bench_config(fam, size)
      name = f'{fam} {size_name}'
      print(f'compiling {name}', flush=True)
      run, fwd, compile_s = make_effjax_step(config)
      tokens = config.train.batch_size * config.data.seq_len
      cands[name] = run
      meta[name] = dict(
        family=fam, size=size_name, tokens_per_step=tokens, flops_per_token_fwd=fwd, compile_s=compile_s
      )
  peak = make_peak(256 if args.quick else 2048)
  times, peaks = interleave(cands, args.rounds, args.warmup, peak)
  rows = []
  for name, m in meta.items():
    ts = times[name]
    row = dict(
      name=name, **m, step_ms=_med(ts) * 1e3, step_ms_best=min(ts) * 1e3, tokens_per_sec=m['tokens_per_step'] / _med(ts)
    )
    row['model_flops_per_sec'] = 3 * m['flops_per_token_fwd'] * row['tokens_per_sec']
    row['mfu'] = row['model_flops_per_sec'] / _med(peaks)
    row['mfu_best'] = 3 * m['flops_per_token_fwd'] * m['tokens_per_step'] / min(ts) / max(peaks)
    rows.append(row)
  return dict(
    rows=rows,
    peak_flops_median=_med(peaks),
    peak_flops_best=max(peaks),
    glibc_tunables=os.environ.get('GLIBC_TUNABLES', ''),
    devices=len(run_devices(first)),
  )


IMPLS = {  # torch sub-benchmark: name -> worker kind
  'effjax CLI': 'effjax-cli',
  'effjax': 'effjax',
  'effjax (rolled scan)': 'effjax-rolled',
  'effjax (unrolled)': 'effjax-unrolled',
  'effjax (one CPU device)': 'effjax-one-device',
  'torch eager': 'torch',
  'torch.compile': 'torch-compile',
}
CLI_LOG_EVERY = 4  # the CLI run of one round: 1 compile step + CLI_WARMUP_WINDOWS + cli_windows() windows
CLI_WINDOWS = 3
# The first windows of a fresh CLI process are slower (at 4L ~87 ms steps for 8 steps, then 51-66 ms; the cause was
# not profiled); the bare worker's warm-up steps are not timed either.
# They are reported apart, as the bare step's first step after idle is.
CLI_WARMUP_WINDOWS = 2
# Steps per implementation per round where a step is short: at 4L (~50 ms steps) a burst of 3 bare steps and 3
# CLI windows of 4 steps were inside the step-to-step noise (CLI windows ranged 48-72 ms in one run), so the
# loop's overhead was not established; 24 steps cost about 1.2 s per implementation and round.
ROUND_STEPS = {'4L-128d-ctx64-b12': 24}


def round_steps(args, size_name: str) -> int:
  """Back-to-back steps each implementation runs per round at this size (the first is reported apart)."""
  return max(args.burst, ROUND_STEPS.get(size_name, 0))


def cli_windows(args, size_name: str) -> int:
  """Logged windows of the CLI's run per round: at least CLI_WINDOWS, and as many steps as the bare bursts."""
  return max(CLI_WINDOWS, -(-round_steps(args, size_name) // CLI_LOG_EVERY))


VARIANTS = ('effjax-unrolled', 'effjax-rolled', 'effjax-one-device')  # bench --unrolled adds their rows


def effjax_config(kind: str, size):
  """The bench GPT as one effjax worker kind runs it: the default, or one setting of a VARIANTS kind changed."""
  over = {'effjax-unrolled': {'scan_layers': False}, 'effjax-rolled': {'scan_unroll': 1}}.get(kind, {})
  config = bench_config('gpt', size, **over)
  if kind == 'effjax-one-device':  # XLA:CPU's own threading of every op on all cores, as before the split
    config.mesh.cpu_devices = 1
  return config


def _build_worker_step(kind: str, size):
  """(one-step callable, forward FLOPs per token, compile/warm-up seconds) for one implementation."""
  if kind.startswith('effjax'):
    return make_effjax_step(effjax_config(kind, size))
  import numpy as np  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from experiments import torch_gpt  # pylint: disable=import-outside-toplevel
  from effjax import accounting  # pylint: disable=import-outside-toplevel

  torch_gpt.set_threads()
  config = bench_config('gpt', size)
  b, t, v = config.train.batch_size, config.data.seq_len, config.model.vocab_size
  torch.manual_seed(0)
  tokens = torch.from_numpy(np.random.default_rng(0).integers(0, v, size=(b, t + 1)))
  inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
  model = torch_gpt.TorchGPT(config.model)
  opt = torch_gpt.make_optimizer(model, config.train)
  if kind == 'torch-compile':
    model = torch.compile(model)
  step = torch_gpt.make_train_step(model, opt, config.train.grad_clip)
  t0 = time.perf_counter()
  step(inputs, targets)  # eager: a warm-up step; compiled: compilation happens here
  compile_s = time.perf_counter() - t0 if kind == 'torch-compile' else 0.0
  return (lambda: step(inputs, targets)), accounting.flops_per_token(config.model, t), compile_s


def _worker(args) -> None:
  """A long-lived timing process: builds one implementation, then runs one step per 'step' line on stdin.

  effjax and torch each run in their own process (interleaved by the parent), so neither framework's idle
  worker threads (XLA's Eigen pool, torch's OpenMP team, both of which spin-wait a while after work) steal the
  two cores from the other: in one shared process the small torch steps were 10-20x slower than alone.
  """
  size = sizes_of(args)[args._size]
  if not args._worker.startswith('torch'):  # effjax and its matmul peak run as the CLI does
    start_jax_as_the_cli(effjax_config(args._worker, size))
  import numpy as np  # pylint: disable=import-outside-toplevel

  if args._worker == 'peak':
    peak, fn, fwd, compile_s = make_peak(256 if args.quick else 2048), None, 0, 0.0
  else:
    fn, fwd, compile_s = _build_worker_step(args._worker, size)
    for _ in range(args.warmup):
      fn()
  reply = lambda obj: print('@@ ' + json.dumps(obj), flush=True)
  devices = len(run_devices(effjax_config(args._worker, size))) if args._worker.startswith('effjax') else 0
  reply({'ready': True, 'compile_s': compile_s, 'fwd': fwd, 'pid': os.getpid(), 'devices': devices})
  for line in sys.stdin:
    cmd = line.strip()
    if cmd.startswith('step'):
      # A burst of back-to-back steps, as in training; the first one after an idle gap is reported apart
      # (after a pause the kernel has to fault the step's freshly allocated temporaries in again).
      ts, faults = [], []
      for _ in range(int(cmd.split()[1]) if ' ' in cmd else 1):
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        faults.append(r1.ru_minflt - r0.ru_minflt)
      reply(
        {
          't': float(np.median(ts[1:] if len(ts) > 1 else ts)),
          't_first': ts[0],
          'faults_per_step': float(np.median(faults)),
        }
      )
    elif cmd == 'peak':
      reply({'peak': peak()})
    else:
      reply({'rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
      return


class _Worker:
  def __init__(self, args, kind: str, size_name: str):
    argv = [
      sys.executable,
      '-m',
      'experiments.bench',
      '--_worker',
      kind,
      '--_size',
      size_name,
      '--warmup',
      str(args.warmup),
    ] + (['--quick'] if args.quick else [])
    self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    self.info = self._read()

  def _read(self) -> dict:
    for line in self.proc.stdout:
      if line.startswith('@@ '):
        return json.loads(line[3:])
    raise RuntimeError(f'benchmark worker {self.proc.args} exited with {self.proc.wait()}')

  def call(self, cmd: str) -> dict:
    self.proc.stdin.write(cmd + '\n')
    self.proc.stdin.flush()
    return self._read()

  def close(self) -> dict:
    out = self.call('quit')
    self.proc.stdin.close()
    self.proc.wait()
    return out


class _CliWorker:
  """`python -m effjax.main` itself, as a user runs it (its own environment, data pipeline, logging, metrics and
  final checkpoint): each call trains a fresh run of 1 + (CLI_WARMUP_WINDOWS + cli_windows()) * CLI_LOG_EVERY
  steps on the embedded corpus (byte tokenizer: vocabulary 256, as the bare step) and reports the median of the
  step times the CLI itself logs after its warm-up windows (effjax.metrics.StepClock: the loop's time between log
  points, compile, eval and checkpoints excluded), and the warm-up windows' median apart."""

  def __init__(self, args, size_name: str):
    layers, d, heads, seq, batch = sizes_of(args)[size_name]
    self.root = tempfile.mkdtemp(prefix='effjax-bench-cli-')
    steps = 1 + (CLI_WARMUP_WINDOWS + cli_windows(args, size_name)) * CLI_LOG_EVERY
    self.argv = [
      sys.executable,
      '-m',
      'effjax.main',
      '--config=gpt',
      '--progress=false',
      f'--config.model.num_layers={layers}',
      f'--config.model.d_model={d}',
      f'--config.model.num_heads={heads}',
      f'--config.model.max_len={seq}',
      f'--config.data.seq_len={seq}',
      f'--config.train.batch_size={batch}',
      '--config.data.tokenizer=byte',
      f'--config.train.steps={steps}',
      f'--config.train.log_every={CLI_LOG_EVERY}',
      f'--config.train.eval_every={steps}',
      f'--config.checkpoint.every={steps}',
    ]
    self.env = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', 'XLA_FLAGS')}
    self.runs = 0
    self._train()  # prepares the dataset once (later runs reuse it through data.dataset) and warms the caches
    self.info = {'compile_s': self.last_wall_s, 'fwd': None}

  def _train(self) -> list[float]:
    workdir = os.path.join(self.root, f'run{self.runs}')
    data = [] if not self.runs else [f'--config.data.dataset={os.path.join(self.root, "run0", "data")}']
    self.runs += 1
    t0 = time.perf_counter()
    subprocess.run(
      self.argv + [f'--workdir={workdir}', *data],
      env=self.env,
      check=True,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL,
    )
    self.last_wall_s = time.perf_counter() - t0
    with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
      rows = [json.loads(line) for line in f]
    return [r['step_time'] for r in rows if r.get('split') == 'train' and r.get('step_time')]

  def call(self, cmd: str) -> dict:
    del cmd
    times = self._train()
    warm, timed = times[:CLI_WARMUP_WINDOWS], times[CLI_WARMUP_WINDOWS:]
    return {'t': _med(timed), 't_first': _med(warm), 'faults_per_step': float('nan')}

  def close(self) -> dict:
    import shutil  # pylint: disable=import-outside-toplevel

    shutil.rmtree(self.root, ignore_errors=True)
    return {'rss_mb': float('nan')}


def machine() -> dict:
  """What the figures depend on besides the code: CPU model, cores, THP mode, glibc, the load."""
  import platform  # pylint: disable=import-outside-toplevel
  from effjax import runtime  # pylint: disable=import-outside-toplevel

  model = ''
  with contextlib.suppress(OSError), open('/proc/cpuinfo', encoding='utf-8') as f:
    model = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), '')
  return dict(
    cpu=model or platform.processor(),
    cpus=os.cpu_count(),
    thp=runtime.transparent_hugepages(),
    glibc=' '.join(platform.libc_ver()),
    python=platform.python_version(),
    load=load_average(),
  )


def _torch_rows(times, firsts, faults, peaks, workers, rss, flops_per_step: float, tokens: int) -> list[dict]:
  """One row per implementation from its interleaved rounds: median and best step, MFU against the same rounds'
  matmul peak, and its step time over effjax's paired within each round."""
  rows = []
  for name, ts in times.items():
    rows.append(
      dict(
        impl=name,
        step_ms=_med(ts) * 1e3,
        step_ms_best=min(ts) * 1e3,
        tokens_per_sec=tokens / _med(ts),
        mfu=flops_per_step / _med(ts) / _med(peaks),
        mfu_best=flops_per_step / min(ts) / max(peaks),
        compile_s=workers[name].info['compile_s'],
        # per-round paired ratio: contention that varies over time cancels within a round
        speedup_of_effjax=_med([a / e for a, e in zip(ts, times['effjax'])]),
        speedup_of_effjax_best=min(ts) / min(times['effjax']),
        first_step_after_idle_ms=_med(firsts[name]) * 1e3,
        page_faults_per_step=_med(faults[name]),
        peak_rss_mb=rss[name],
      )
    )
  return rows


def run_torch(args) -> dict:
  import torch  # pylint: disable=import-outside-toplevel

  results = []
  impls = {
    k: v
    for k, v in IMPLS.items()
    if (args.unrolled or v not in VARIANTS) and (args.torch_compile or v != 'torch-compile')
  }
  for size_name, size in sizes_of(args).items():
    b, t = size[4], size[3]
    workers, peak_worker = {}, None
    try:
      peak_worker = _Worker(args, 'peak', size_name)
      for name, kind in impls.items():  # one at a time, so compile times are not contended by each other
        print(f'{size_name}: starting {name}', flush=True)
        workers[name] = _CliWorker(args, size_name) if kind == 'effjax-cli' else _Worker(args, kind, size_name)
      (times, firsts, faults), peaks = ({k: [] for k in workers} for _ in range(3)), []
      start = time.time()
      names = list(workers)
      for r in range(args.rounds):
        peaks.append(peak_worker.call('peak')['peak'])
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate: no fixed predecessor
          out = workers[name].call(f'step {round_steps(args, size_name)}')
          times[name].append(out['t'])
          firsts[name].append(out['t_first'])
          faults[name].append(out['faults_per_step'])
        done = time.time() - start
        print(
          f'  {size_name} round {r + 1}/{args.rounds}  {done:.0f}s elapsed, ETA '
          f'{done / (r + 1) * (args.rounds - r - 1):.0f}s, load {load_average()[0]}',
          flush=True,
        )
      rss = {name: w.close()['rss_mb'] for name, w in workers.items()}
      peak_worker.close()
    finally:
      for w in [*workers.values(), *([peak_worker] if peak_worker else [])]:
        if getattr(w, 'proc', None) is not None and w.proc.poll() is None:  # (a _CliWorker has no process left)
          w.proc.kill()
    fwd = workers['effjax'].info['fwd']
    rows = _torch_rows(times, firsts, faults, peaks, workers, rss, flops_per_step=3 * fwd * b * t, tokens=b * t)
    results.append(
      dict(
        size=size_name,
        batch=b,
        seq_len=t,
        flops_per_token_fwd=fwd,
        effjax_devices=workers['effjax'].info['devices'],
        steps_per_round=round_steps(args, size_name),
        cli_steps_per_round=cli_windows(args, size_name) * CLI_LOG_EVERY,
        rows=rows,
        peak_flops_median=_med(peaks),
        peak_flops_best=max(peaks),
        times_s={k: list(v) for k, v in times.items()},
        first_step_times_s={k: list(v) for k, v in firsts.items()},
      )
    )
  from experiments import torch_gpt  # pylint: disable=import-outside-toplevel

  return dict(
    sizes=results,
    torch=torch.__version__,
    torch_threads=torch_gpt.set_threads(),
    glibc_tunables=os.environ.get('GLIBC_TUNABLES', ''),
    processes='one per implementation',
    machine=machine(),
  )


def run_compile(args) -> dict:
  from experiments import bench_compile  # pylint: disable=import-outside-toplevel

  if args.quick:
    bench_compile.ROUNDS = 1
    bench_compile.CASES = {k: v for k, v in bench_compile.CASES.items() if v[0] == 4}
    bench_compile.RATIOS = {}
    bench_compile.OUT = _quick_out(args)
  bench_compile.main()
  with open(os.path.join(bench_compile.OUT, 'bench_compile.json'), encoding='utf-8') as f:
    return json.load(f)


def run_structured(args) -> dict:
  from experiments import bench_structured  # pylint: disable=import-outside-toplevel

  if args.quick:
    bench_structured.ROUNDS, bench_structured.BATCH, bench_structured.ROWS = 1, 16, 16
    bench_structured.STREAM_MB, bench_structured.PEAK_N = 4, 256
    machine = bench_structured.measure_machine()
    rows = bench_structured.bench_fwht(64, machine) + bench_structured.bench_layer(64, 256, machine)
    return dict(rows=rows, meta={})
  bench_structured.main()
  with open(os.path.join(bench_structured.OUT, 'bench_structured.json'), encoding='utf-8') as f:
    return json.load(f)


def _quick_out(args):
  import pathlib  # pylint: disable=import-outside-toplevel

  return pathlib.Path(os.path.dirname(args.out) or '.') / 'quick'


def run_sample(args) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  from effjax import sample  # pylint: disable=import-outside-toplevel
  from effjax.models import build_model  # pylint: disable=import-outside-toplevel

  rows = []
  for size_name, size in sizes_of(args).items():
    config = bench_config('gpt', size)
    m = config.model
    model = build_model(m)
    variables = {'params': nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))['params']}
    for batch in (1, 4):
      prompt_len = min(16, m.max_len // 4)
      new = min(m.max_len - prompt_len, 112)  # no-cache cost grows with the whole buffer: keep it short
      prompt = jax.random.randint(jax.random.key(1), (batch, prompt_len), 0, m.vocab_size, jnp.int32)
      fns = {}
      for name, fn in (('kv cache', sample.generate_cached), ('no cache', sample.generate_uncached)):
        kw = dict(max_new_tokens=new, temperature=0.0)
        t0 = time.perf_counter()
        fn(model, variables, prompt, jax.random.key(2), **kw).block_until_ready()
        fns[name] = (
          lambda fn=fn, kw=kw: fn(model, variables, prompt, jax.random.key(2), **kw).block_until_ready(),
          time.perf_counter() - t0,
        )
      out_c = sample.generate_cached(model, variables, prompt, jax.random.key(2), max_new_tokens=new, temperature=0.0)
      out_u = sample.generate_uncached(model, variables, prompt, jax.random.key(2), max_new_tokens=new, temperature=0.0)
      same = float((out_c == out_u).mean())
      times, _ = interleave(
        {k: v[0] for k, v in fns.items()}, max(args.rounds // 2, 1), 0, progress=f'{size_name} b{batch} '
      )
      base = _med(times['no cache'])
      for name, ts in times.items():
        rows.append(
          dict(
            size=size_name,
            batch=batch,
            impl=name,
            prompt=prompt_len,
            new_tokens=new,
            ms=_med(ts) * 1e3,
            tokens_per_sec=batch * new / _med(ts),
            first_call_s=fns[name][1],
            speedup=base / _med(ts),
            greedy_agreement=same,
          )
        )
  return dict(rows=rows)


def run_memory(args) -> dict:
  """One fresh subprocess per family (large size): RSS of compiling + two steps, XLA's analysis, the plan."""
  rows = []
  families = args.families.split(',') if args.families else FAMILIES
  size_name, _ = list(sizes_of(args).items())[-1]
  for fam in families:
    with tempfile.NamedTemporaryFile('r', suffix='.json') as tmp:
      cmd = [
        sys.executable,
        '-m',
        'experiments.bench',
        '--_memory_child',
        fam,
        '--_child_out',
        tmp.name,
        *(['--quick'] if args.quick else []),
      ]
      print(f'memory: {fam} {size_name}', flush=True)
      subprocess.run(cmd, check=True)
      rows.append(json.load(open(tmp.name, encoding='utf-8')))
  return dict(rows=rows, size=size_name)


def _memory_child(family: str, args) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  from effjax import accounting  # pylint: disable=import-outside-toplevel

  size_name, size = list(sizes_of(args).items())[-1]
  config = bench_config(family, size)
  rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  import numpy as np  # pylint: disable=import-outside-toplevel
  from effjax import state as state_lib, train  # pylint: disable=import-outside-toplevel

  setup = state_lib.make_setup(config, devices=jax.devices()[:1])
  state = setup.init_fn(jax.random.key(0))
  b, t, v = config.train.batch_size, config.data.seq_len, config.model.vocab_size
  tokens = np.random.default_rng(0).integers(0, v, size=(b, t + 1), dtype=np.int32)
  batch = jax.device_put({'inputs': tokens[:, :-1], 'targets': tokens[:, 1:]}, setup.batch_sharding)
  compiled = train.make_train_step(setup, config).lower(state, batch).compile()
  analysis = {}
  try:
    ma = compiled.memory_analysis()
    analysis = {
      k: int(getattr(ma, k))
      for k in ('temp_size_in_bytes', 'argument_size_in_bytes', 'output_size_in_bytes', 'generated_code_size_in_bytes')
      if hasattr(ma, k)
    }
  except Exception as e:  # pylint: disable=broad-except
    analysis = {'error': str(e)}
  for _ in range(2):
    state, m = compiled(state, batch)
  jax.block_until_ready(m)
  counts = accounting.param_counts(config.model)
  row = dict(
    family=family,
    size=size_name,
    maxrss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    rss_before_model_mb=rss0 / 1024,
    total_params=counts['total_params'],
    trainable_params=counts['trainable_params'],
    xla=analysis,
  )
  try:
    from effjax import memory  # pylint: disable=import-outside-toplevel

    p = memory.plan(config, num_devices=1)
    row['plan'] = {
      k: p[k]
      for k in ('param_bytes', 'frozen_bytes', 'grad_bytes', 'optimizer_bytes', 'activation_bytes', 'total_bytes')
    }
  except Exception as e:  # pylint: disable=broad-except
    row['plan'] = {'error': str(e)}
  return row


RUNNERS = {
  'train': run_train,
  'torch': run_torch,
  'compile': run_compile,
  'structured': run_structured,
  'sample': run_sample,
  'memory': run_memory,
}


# ------------------------------------------------------------------------------------------------- markdown
def _gf(x):
  return f'{x / 1e9:.1f}'


def speed_ceiling(size_result: dict) -> dict:
  """The fastest any implementation could run this step here: its FLOPs at the best matmul rate of the same
  rounds (every op a peak-speed matmul, none memory-bound), and that as a multiple of each torch row's median."""
  flops = 3 * size_result['flops_per_token_fwd'] * size_result['batch'] * size_result['seq_len']
  bound_ms = 1e3 * flops / size_result['peak_flops_best']
  torch_rows = {r['impl']: r['step_ms'] for r in size_result['rows'] if r['impl'].startswith('torch')}
  return dict(step_gflop=flops / 1e9, bound_ms=bound_ms, max_speedup={k: v / bound_ms for k, v in torch_rows.items()})


def _torch_section(r) -> list[str]:
  out = []
  out += [
    '## effjax vs the PyTorch reference (same GPT, same batch, AdamW step included)',
    '',
    f'torch {r["result"]["torch"]} with {r["result"]["torch_threads"]} threads; '
    f'GLIBC_TUNABLES of the harness={r["result"].get("glibc_tunables") or "(unset)"}; {r["meta"]}; '
    f'machine: {r["result"].get("machine", {})}',
    '',
    '`effjax CLI` is `python -m effjax.main` itself (data pipeline, logging, its own huge-page and CPU-device '
    'settings); the other effjax rows time the bare jitted step; its `compile s` is the wall time of its first '
    'whole run (preparing the dataset included). XLA:CPU devices of the effjax rows (one per core, as the CLI '
    'picks them; `one CPU device` is mesh.cpu_devices=1, every op threaded over all cores): '
    + ', '.join(f'{s["size"]}: {s.get("effjax_devices", 1)}' for s in r['result']['sizes'])
    + '.',
    '',
    'Steps per implementation per round: '
    + '; '.join(
      f'{s["size"]}: {s.get("steps_per_round", "?")} bare (median of all but the first), CLI '
      f'{s.get("cli_steps_per_round", "?")} (median of its logged windows of {CLI_LOG_EVERY} after '
      f'{CLI_WARMUP_WINDOWS} warm-up windows, whose median is its first step after idle)'
      for s in r['result']['sizes']
    )
    + '.',
    '',
    '| size | impl | step ms (median) | step ms (best) | tokens/s | MFU (median) | MFU (best) | '
    'effjax speedup over it (paired median) | (best/best) | compile s | first step after idle ms | '
    'page faults/step | peak RSS MB |',
    '|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|',
  ]
  for s in r['result']['sizes']:
    for row in s['rows']:
      out.append(
        f'| {s["size"]} | {row["impl"]} | {row["step_ms"]:.1f} | {row["step_ms_best"]:.1f} | '
        f'{row["tokens_per_sec"]:,.0f} | {100 * row["mfu"]:.1f}% | {100 * row["mfu_best"]:.1f}% | '
        f'{row["speedup_of_effjax"]:.2f}x | {row["speedup_of_effjax_best"]:.2f}x | '
        f'{row["compile_s"]:.1f} | {row.get("first_step_after_idle_ms", float("nan")):.0f} | '
        f'{row.get("page_faults_per_step", float("nan")):,.0f} | '
        f'{row.get("peak_rss_mb", float("nan")):.0f} |'
      )
    out.append(
      f'| {s["size"]} | peak jitted f32 2048² matmul | | | | {_gf(s["peak_flops_median"])} GFLOP/s '
      f'(median) | {_gf(s["peak_flops_best"])} GFLOP/s (best) | | | | | | |'
    )
  out.append('')
  for s in r['result']['sizes']:
    c = speed_ceiling(s)
    out.append(
      f'Ceiling at {s["size"]}: {c["step_gflop"]:.1f} GFLOP per step at the best matmul rate of these rounds take '
      f'at least {c["bound_ms"]:.1f} ms, so no implementation can be faster than '
      + ', '.join(f'{v:.2f}x {k}' for k, v in c['max_speedup'].items())
      + ' (median steps) on this machine.'
    )
  out.append('')
  return out


def _train_section(r) -> list[str]:
  out = []
  res = r['result']
  out += [
    '## Training throughput and MFU by family',
    '',
    f'{r["meta"]}; GLIBC_TUNABLES of the timing process={res.get("glibc_tunables") or "(unset)"}; peak matmul '
    f'{_gf(res["peak_flops_median"])} GFLOP/s median, {_gf(res["peak_flops_best"])} best; XLA:CPU devices '
    f'{res.get("devices", 1)} (one per core, as the CLI picks them)',
    '',
    '| family | size | step ms (median) | tokens/s | model GFLOP/s | MFU (median) | MFU (best) | compile s |',
    '|---|---|---:|---:|---:|---:|---:|---:|',
  ]
  for row in res['rows']:
    out.append(
      f'| {row["family"]} | {row["size"]} | {row["step_ms"]:.1f} | {row["tokens_per_sec"]:,.0f} | '
      f'{_gf(row["model_flops_per_sec"])} | {100 * row["mfu"]:.1f}% | {100 * row["mfu_best"]:.1f}% | '
      f'{row["compile_s"]:.1f} |'
    )
  out += [
    '',
    "Model FLOPs are each family's own forward FLOPs x 3 (structured layers at their true "
    "O(n log n) cost, so FastFood's MFU is low by construction).",
    '',
  ]
  return out


def _sample_section(r) -> list[str]:
  out = []
  out += [
    '## Sampling: KV cache vs no cache (greedy)',
    '',
    r['meta'],
    '',
    '| size | batch | impl | prompt | new tokens | ms (median) | tokens/s | cache speedup | first call s | '
    'greedy agreement |',
    '|---|---:|---|---:|---:|---:|---:|---:|---:|---:|',
  ]
  for row in r['result']['rows']:
    out.append(
      f'| {row["size"]} | {row["batch"]} | {row["impl"]} | {row["prompt"]} | {row["new_tokens"]} | '
      f'{row["ms"]:.1f} | {row["tokens_per_sec"]:,.0f} | {row["speedup"]:.2f}x | '
      f'{row["first_call_s"]:.1f} | {row["greedy_agreement"]:.3f} |'
    )
  out.append('')
  return out


def _compile_section(r) -> list[str]:
  out = []
  res = r['result']
  out += [
    '## Compile times (experiments/bench_compile.py)',
    '',
    r['meta'],
    '',
    '| stack | layers | lower s | compile s | StableHLO chars |',
    '|---|---:|---:|---:|---:|',
  ]
  out += [
    f'| {x["case"]} | {x["num_layers"]} | {x["lower_s"]:.2f} | {x["compile_s"]:.2f} | {x["hlo_chars"]:,} |'
    for x in res.get('rows', [])
  ]
  if res.get('ratios'):
    out += ['', '| ratio | compile | lower+compile |', '|---|---:|---:|']
    out += [f'| {k} | {v["compile"]:.2f}x | {v["lower+compile"]:.2f}x |' for k, v in res['ratios'].items()]
  out.append('')
  return out


def _structured_section(r) -> list[str]:
  out = []
  out += [
    '## Structured layers vs dense (experiments/bench_structured.py)',
    '',
    r['meta'],
    '',
    '| benchmark | shape | impl | ms | params | roofline bound ms | interface bound ms | speedup vs dense |',
    '|---|---|---|---:|---:|---:|---:|---:|',
  ]
  out += [
    f'| {x["bench"]} | {x["shape"]} | {x["impl"]} | {x["ms"]:.2f} | {x["params"]:,} | {x["bound_ms"]:.2f} | '
    f'{x["floor_ms"]:.2f} | {x["speedup"]:.1f}x |'
    for x in r['result']['rows']
  ]
  out.append('')
  return out


def _memory_section(r) -> list[str]:
  out = []
  mb = lambda b: f'{b / 2**20:.0f}'
  out += [
    f'## Peak memory of one training process ({r["result"]["size"]})',
    '',
    r['meta'],
    '',
    '| family | params | peak RSS MB | RSS growth after imports MB | XLA temp MB | XLA args MB | '
    'plan: params+grads+opt MB | plan: activations MB |',
    '|---|---:|---:|---:|---:|---:|---:|---:|',
  ]
  for x in r['result']['rows']:
    p, xla = x.get('plan', {}), x.get('xla', {})
    pgo = sum(p.get(k, 0) for k in ('param_bytes', 'frozen_bytes', 'grad_bytes', 'optimizer_bytes'))
    out.append(
      f'| {x["family"]} | {x["total_params"]:,} | {x["maxrss_mb"]:.0f} | '
      f'{x["maxrss_mb"] - x["rss_before_model_mb"]:.0f} | '
      f'{mb(xla.get("temp_size_in_bytes", 0))} | {mb(xla.get("argument_size_in_bytes", 0))} | '
      f'{mb(pgo)} | {mb(p.get("activation_bytes", 0))} |'
    )
  out.append('')
  return out


def _rss_section(results: dict) -> list[str]:
  out = []
  rss = [(k, v['maxrss_mb'], v['wall_s']) for k, v in results.items() if 'maxrss_mb' in v]
  if rss:
    out += [
      '## Peak RSS and wall time of each sub-benchmark process',
      '',
      '| sub-benchmark | peak RSS MB | wall s |',
      '|---|---:|---:|',
    ]
    out += [f'| {k} | {m:.0f} | {w:.0f} |' for k, m, w in rss]
    out.append('')
  return out


SECTIONS = {
  'torch': _torch_section,
  'train': _train_section,
  'sample': _sample_section,
  'compile': _compile_section,
  'structured': _structured_section,
  'memory': _memory_section,
}


def markdown(results: dict) -> str:
  out = [
    '# effjax benchmark suite',
    '',
    'Generated by `python -m experiments.bench` (experiments/bench.py). 2-core CPU shared with other jobs: '
    'candidates of one table were timed in interleaved rounds (contention hits them alike); `median` uses '
    'the median step and the median peak of the same rounds, `best` the fastest of each.',
    '',
  ]
  for name, section in SECTIONS.items():
    if results.get(name):
      out += section(results[name])
  out += _rss_section(results)
  return '\n'.join(out)


# ------------------------------------------------------------------------------------------------------ main
def parse(argv):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--only', default=','.join(SUBS), help=f'comma-separated subset of {",".join(SUBS)}')
  p.add_argument('--rounds', type=int, default=6, help='interleaved timing rounds')
  p.add_argument('--warmup', type=int, default=2)
  p.add_argument(
    '--burst',
    type=int,
    default=3,
    help='torch: back-to-back steps per implementation per round (the first is reported apart); sizes with short '
    'steps run more (bench.ROUND_STEPS)',
  )
  p.add_argument('--families', default='', help='train/memory: comma-separated subset of families')
  p.add_argument('--torch_compile', action=argparse.BooleanOptionalAction, default=True)
  p.add_argument(
    '--unrolled',
    action=argparse.BooleanOptionalAction,
    default=True,
    help='torch: also time effjax with scan_layers=False, with the rolled scan (model.scan_unroll=1) and on one '
    'CPU device (mesh.cpu_devices=1)',
  )
  p.add_argument(
    '--hugepages',
    action=argparse.BooleanOptionalAction,
    default=False,
    help='run every sub-benchmark (torch too) with GLIBC_TUNABLES=glibc.malloc.hugetlb=1; off by '
    'default: effjax sets it for itself (effjax/runtime.py) and torch runs as users run it',
  )
  p.add_argument('--quick', action='store_true', help='tiny sizes (tests, smoke runs)')
  p.add_argument('--out', default='experiments/results/bench', help='output prefix (.json / .md)')
  p.add_argument('--_child', default='', help=argparse.SUPPRESS)
  p.add_argument('--_memory_child', default='', help=argparse.SUPPRESS)
  p.add_argument('--_child_out', default='', help=argparse.SUPPRESS)
  p.add_argument('--_worker', default='', help=argparse.SUPPRESS)
  p.add_argument('--_size', default='', help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  bad = [s for s in args.only.split(',') if s not in SUBS]
  if bad:
    p.error(f'--only: unknown sub-benchmark(s) {bad}; valid: {",".join(SUBS)}')
  return args


def _child_argv(args, name, out):
  argv = [
    sys.executable,
    '-m',
    'experiments.bench',
    '--_child',
    name,
    '--_child_out',
    out,
    '--rounds',
    str(args.rounds),
    '--warmup',
    str(args.warmup),
    '--burst',
    str(args.burst),
    '--out',
    args.out,
  ]
  if args.families:
    argv += ['--families', args.families]
  argv += ['--hugepages' if args.hugepages else '--no-hugepages']
  argv += [
    '--torch_compile' if args.torch_compile else '--no-torch_compile',
    '--unrolled' if args.unrolled else '--no-unrolled',
  ]
  return argv + (['--quick'] if args.quick else [])


def main(argv=None) -> dict:
  args = parse(argv)
  if args._worker:
    _worker(args)
    return {}
  if args._child or args._memory_child:
    result = RUNNERS[args._child](args) if args._child else _memory_child(args._memory_child, args)
    result['maxrss_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open(args._child_out, 'w', encoding='utf-8') as f:
      json.dump(result, f, default=float)
    return result
  path = args.out + '.json'
  results = {}
  if os.path.exists(path):
    with open(path, encoding='utf-8') as f:
      results = json.load(f)
  selected = args.only.split(',')
  for i, name in enumerate(selected):
    print(f'== [{i + 1}/{len(selected)}] {name}  (load {load_average()})', flush=True)
    before, t0 = load_average(), time.time()
    with tempfile.NamedTemporaryFile('r', suffix='.json', delete=False) as tmp:
      out = tmp.name
    try:
      env = dict(os.environ)
      if args.hugepages:
        env['GLIBC_TUNABLES'] = ':'.join(x for x in (env.get('GLIBC_TUNABLES', ''), 'glibc.malloc.hugetlb=1') if x)
      subprocess.run(_child_argv(args, name, out), check=True, env=env)
      with open(out, encoding='utf-8') as f:
        result = json.load(f)
    finally:
      os.unlink(out)
    results[name] = dict(
      result=result,
      wall_s=time.time() - t0,
      maxrss_mb=result.pop('maxrss_mb'),
      meta=f'load average {before[0]:.2f} before, {load_average()[0]:.2f} after; '
      f'huge pages for malloc: {"on" if args.hugepages else "off"}; '
      f'{os.cpu_count()} CPUs; {time.strftime("%Y-%m-%d %H:%M")}',
      quick=args.quick,
    )
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    with open(path, 'w', encoding='utf-8') as f:
      json.dump(results, f, indent=1, default=float)
    with open(args.out + '.md', 'w', encoding='utf-8') as f:
      f.write(markdown(results))
  print(markdown({k: results[k] for k in selected if k in results}))
  return results


if __name__ == '__main__':
  main()
