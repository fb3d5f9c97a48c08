"""KV-cache decoding: effjax vs Hugging Face transformers `generate` on the same GPT-2-shaped model.

    python -m experiments.bench_decode                      # GPT-2 small shape, batch 1 and 8, 256 new tokens
    python -m experiments.bench_decode --layers=2 --width=64 --heads=4 --vocab=512 --new_tokens=32 --rounds=1

A GPT-2 with random weights is built with transformers (no download), saved as a Hugging Face directory and
imported with `effjax.convert.hf_gpt2` (the path a user takes); both then decode the same random prompts greedily
with a KV cache. Per batch size, in interleaved rounds: the whole generation (prefill + new tokens), the prefill
alone (one new token), tokens/s and the per-token latency ((whole - prefill) / (new - 1)); and whether the greedy
tokens are identical. torch runs with torch.set_num_threads(cores); effjax's generation is one jitted program
(sample.generate_cached: prefill, then a lax.scan over the new tokens; the KV cache holds prompt + new tokens
rounded up to 64). The import is relaid out for decoding once, before timing (sample.decoding_layout, as
sample.generate does once per call; the time is recorded as relayout_s): its scanned layer stack unrolled and, on
CPU, its dense kernels stored [out, in] (structured.matmul_out_major).
Beside them, the weight-streaming floor: `batch` rows multiplied once by every weight matrix of the decode layout
(dense kernels and the tied head's table; positions and KV cache not counted), with the kernel decoding uses and
nothing else, timed in the same rounds (weight_floor). No decoder of these f32 weights does a new token faster on
this machine, so transformers' per-token time over the floor is the largest speedup over it the machine allows.
Records the CPU model, cores, transparent-hugepage mode, GLIBC_TUNABLES (malloc huge pages) and the load average
before and after. Writes experiments/results/bench_decode.{json,md} (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')


def build_pair(layers: int, width: int, heads: int, vocab: int, ctx: int, root: str, seed: int = 0):
  """(HF model, effjax model, effjax variables): one random GPT-2, imported through effjax.convert.hf_gpt2."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  import effjax  # pylint: disable=import-outside-toplevel
  from effjax.convert import hf_gpt2  # pylint: disable=import-outside-toplevel
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # pylint: disable=import-outside-toplevel

  torch.manual_seed(seed)
  config = transformers.GPT2Config(
    vocab_size=vocab, n_positions=ctx, n_embd=width, n_layer=layers, n_head=heads, bos_token_id=0, eos_token_id=0
  )
  hf = transformers.GPT2LMHeadModel(config).eval()
  hf_dir = os.path.join(root, 'hf')
  hf.save_pretrained(hf_dir)
  tok = Tokenizer(models.BPE())  # a byte-level tokenizer file the import needs; decoding is not benchmarked
  tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
  tok.add_tokens([f'<t{i}>' for i in range(min(vocab, 256))])
  with open(os.path.join(hf_dir, 'tokenizer.json'), 'w', encoding='utf-8') as f:
    f.write(tok.to_str())
  hf_gpt2.import_hf(hf_dir, os.path.join(root, 'export'))
  model, variables, _ = effjax.load_export(os.path.join(root, 'export'))
  return hf, model, variables


def hf_generate(hf, prompt: np.ndarray, new: int) -> np.ndarray:
  import torch  # pylint: disable=import-outside-toplevel

  with torch.inference_mode():
    ids = torch.from_numpy(prompt.astype(np.int64))
    out = hf.generate(
      ids,
      attention_mask=torch.ones_like(ids),
      max_new_tokens=new,
      min_new_tokens=new,
      do_sample=False,
      use_cache=True,
      pad_token_id=0,
      eos_token_id=None,
    )
  return out[:, prompt.shape[1] :].numpy()


def effjax_generate(model, variables, prompt: np.ndarray, new: int) -> np.ndarray:
  import jax  # pylint: disable=import-outside-toplevel
  from effjax import sample  # pylint: disable=import-outside-toplevel

  out = sample.generate_cached(
    model, variables, jax.numpy.asarray(prompt, jax.numpy.int32), jax.random.key(0), max_new_tokens=new, temperature=0.0
  )
  return np.asarray(jax.block_until_ready(out))


FLOOR_REPEATS = 10  # floor calls per round (one is ~20 ms at GPT-2 shape, batch 1): their median is the round's


def weight_floor(model, variables, batch: int):
  """(jitted callable, bytes it reads): `batch` rows through every weight matrix once, as decoding multiplies
  them (structured.matmul_out_major for [out, in] kernels and the head's [vocab, d] table), the sum of the results
  returned so nothing is dropped. The position table (one row per token) is left out."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from effjax.models import layers, structured  # pylint: disable=import-outside-toplevel

  out_major = layers.out_major(model.cfg)
  mats = [
    (leaf, key[-1].key == 'embedding' or out_major)
    for key, leaf in jax.tree_util.tree_flatten_with_path(variables['params'])[0]
    if leaf.ndim == 2 and key[-1].key in ('kernel', 'embedding')
  ]

  @jax.jit
  def floor(weights):
    total = jnp.zeros((), jnp.float32)
    for w, is_out_major in zip(weights, (m for _, m in mats)):
      x = jnp.full((batch, w.shape[1 if is_out_major else 0]), 0.01, w.dtype)
      total += jnp.sum(structured.matmul_out_major(x, w) if is_out_major else x @ w)
    return total

  weights = [w for w, _ in mats]
  return (lambda: jax.block_until_ready(floor(weights))), sum(w.nbytes for w in weights)


def run(args) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from effjax import sample  # pylint: disable=import-outside-toplevel
  from effjax.models import layers  # pylint: disable=import-outside-toplevel
  from experiments.bench import machine  # pylint: disable=import-outside-toplevel

  torch.set_num_threads(os.cpu_count() or 1)
  rows = []
  env = dict(
    machine(), glibc_tunables=os.environ.get('GLIBC_TUNABLES', ''), jax=jax.__version__, backend=jax.default_backend()
  )
  with tempfile.TemporaryDirectory() as root:
    hf, model, variables = build_pair(args.layers, args.width, args.heads, args.vocab, args.ctx, root)
    t0 = time.perf_counter()
    model, variables = jax.block_until_ready(sample.decoding_layout(model, variables))
    env['relayout_s'], env['decode_layers'] = (
      time.perf_counter() - t0,
      ('scanned' if model.cfg.scan_layers else 'unrolled'),
    )
    env['decode_kernels'] = '[out, in]' if layers.out_major(model.cfg) else '[in, out]'
    for batch in args.batches:
      prompt = np.random.default_rng(batch).integers(0, args.vocab, (batch, args.prompt_len)).astype(np.int32)
      floor, floor_bytes = weight_floor(model, variables, batch)
      fns = {
        ('effjax', 'floor'): lambda: [floor() for _ in range(FLOOR_REPEATS)],
        ('effjax', 'whole'): lambda: effjax_generate(model, variables, prompt, args.new_tokens),
        ('effjax', 'prefill'): lambda: effjax_generate(model, variables, prompt, 1),
        ('transformers', 'whole'): lambda: hf_generate(hf, prompt, args.new_tokens),
        ('transformers', 'prefill'): lambda: hf_generate(hf, prompt, 1),
      }
      first = {}
      for key, fn in fns.items():  # the first call compiles (effjax) or warms up (torch)
        t0 = time.perf_counter()
        fn()
        first[key] = time.perf_counter() - t0
      times = {k: [] for k in fns}
      for r in range(args.rounds):
        for key in list(fns)[r % len(fns) :] + list(fns)[: r % len(fns)]:
          t0 = time.perf_counter()
          fns[key]()
          times[key].append(time.perf_counter() - t0)
        print(f'batch {batch} round {r + 1}/{args.rounds}  load {os.getloadavg()[0]:.2f}', flush=True)
      ours, theirs = fns[('effjax', 'whole')](), fns[('transformers', 'whole')]()
      med = {k: float(np.median(v)) for k, v in times.items()}
      for impl in ('effjax', 'transformers'):
        whole, prefill = med[(impl, 'whole')], med[(impl, 'prefill')]
        rows.append(
          dict(
            impl=impl,
            batch=batch,
            prompt=args.prompt_len,
            new_tokens=args.new_tokens,
            whole_s=whole,
            prefill_ms=prefill * 1e3,
            per_token_ms=(whole - prefill) / max(args.new_tokens - 1, 1) * 1e3,
            tokens_per_sec=batch * args.new_tokens / whole,
            first_call_s=first[(impl, 'whole')],
            times_s=times[(impl, 'whole')],
          )
        )
      rows[-2]['speedup_vs_transformers'] = med[('transformers', 'whole')] / med[('effjax', 'whole')]
      floor_ms = med[('effjax', 'floor')] / FLOOR_REPEATS * 1e3
      rows[-2].update(floor_ms=floor_ms, floor_bytes=floor_bytes, floor_gb_per_s=floor_bytes / floor_ms / 1e6)
      rows[-2]['floor_allows'] = rows[-1]['per_token_ms'] / floor_ms  # transformers' per token over the floor
      rows[-2]['cache_len'] = sample.cache_length(args.prompt_len, args.new_tokens, model.cfg.max_len)
      rows[-2]['greedy_identical'] = bool((ours == theirs).all())
      rows[-2]['greedy_agreement'] = float((ours == theirs).mean())
  shape = dict(layers=args.layers, width=args.width, heads=args.heads, vocab=args.vocab, ctx=args.ctx)
  return dict(
    command='python -m experiments.bench_decode ' + ' '.join(args.argv),
    model=shape,
    rows=rows,
    torch=torch.__version__,
    torch_threads=torch.get_num_threads(),
    load=list(os.getloadavg()),
    load_before=env.pop('load'),
    machine=env,
    date=time.strftime('%Y-%m-%d %H:%M'),
  )


def _load(load) -> str:
  return '/'.join(f'{x:.2f}' for x in load) if isinstance(load, (list, tuple)) else f'{load}'


def markdown(result: dict) -> str:
  m, mach = result['model'], result['machine']
  out = [
    '# KV-cache decoding: effjax vs transformers generate (greedy)',
    '',
    f'`{result["command"]}`; GPT-2 shape {m["layers"]}L/{m["width"]}d/{m["heads"]}h, vocab {m["vocab"]}; '
    f'torch {result["torch"]} ({result["torch_threads"]} threads); load before '
    f'{_load(result["load_before"])}, after {_load(result["load"])}; {result["date"]}',
    '',
    f'{mach["cpu"]} ({mach["cpus"]} cores); jax {mach["jax"]} on {mach["backend"]}; transparent huge pages '
    f'{mach["thp"]}; GLIBC_TUNABLES={mach["glibc_tunables"] or "(unset)"}; {mach["glibc"]}; effjax decodes with '
    f'{mach["decode_layers"]} layers and {mach.get("decode_kernels", "[in, out]")} dense kernels (relaid out once '
    f'in {mach["relayout_s"]:.1f} s)',
    '',
    '| impl | batch | prompt | new | whole s | prefill ms | per-token ms | tokens/s | effjax speedup | '
    'greedy identical |',
    '|---|---:|---:|---:|---:|---:|---:|---:|---:|---|',
  ]
  floors = [r for r in result['rows'] if 'floor_ms' in r]
  for r in result['rows']:
    out.append(
      f'| {r["impl"]} | {r["batch"]} | {r["prompt"]} | {r["new_tokens"]} | {r["whole_s"]:.2f} | '
      f'{r["prefill_ms"]:.1f} | {r["per_token_ms"]:.2f} | {r["tokens_per_sec"]:,.1f} | '
      f'{r.get("speedup_vs_transformers", float("nan")):.2f}x | {r.get("greedy_identical", "")} |'
    )
  if floors:
    out += [
      '',
      'Weight-streaming floor (every weight matrix read once by the decode kernel, nothing else; same rounds):',
      '',
      '| batch | floor ms | GB/s | effjax per-token / floor | transformers per-token / floor (largest possible '
      'speedup) |',
      '|---:|---:|---:|---:|---:|',
    ]
    for r in floors:
      out.append(
        f'| {r["batch"]} | {r["floor_ms"]:.2f} | {r["floor_gb_per_s"]:.1f} | '
        f'{r["per_token_ms"] / r["floor_ms"]:.2f}x | {r["floor_allows"]:.2f}x |'
      )
  return '\n'.join(out) + '\n'


def main(argv=None) -> dict:
  import sys  # pylint: disable=import-outside-toplevel

  argv = sys.argv[1:] if argv is None else argv
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--layers', type=int, default=12)
  p.add_argument('--width', type=int, default=768)
  p.add_argument('--heads', type=int, default=12)
  p.add_argument('--vocab', type=int, default=50257)
  p.add_argument('--ctx', type=int, default=1024)
  p.add_argument('--prompt_len', type=int, default=16)
  p.add_argument('--new_tokens', type=int, default=256)
  p.add_argument('--batches', type=lambda s: [int(x) for x in s.split(',')], default=[1, 8])
  p.add_argument('--rounds', type=int, default=3)
  p.add_argument('--out', default=os.path.join(RESULTS, 'bench_decode'))
  args = p.parse_args(argv)
  args.argv = argv
  result = run(args)
  os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
  with open(args.out + '.json', 'w', encoding='utf-8') as f:
    json.dump(result, f, indent=1)
  with open(args.out + '.md', 'w', encoding='utf-8') as f:
    f.write(markdown(result))
  print(markdown(result))
  return result


if __name__ == '__main__':
  main()
