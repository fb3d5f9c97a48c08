"""Hugging Face GPT-2 <-> effjax export, both directions, with no download.

  python -m effjax.convert.hf_gpt2 --hf_dir=H --export_dir=E [--no-scan_layers] [--dtype=bfloat16]
      imports a local GPT-2 directory (config.json + model.safetensors, sharded model-*.safetensors with their
      index, or pytorch_model.bin; tokenizer.json or vocab.json + merges.txt, or --tokenizer=FILE) into an effjax
      export usable by `--mode=sample --from_export=E` and `effjax.load_export(E)`.
  python -m effjax.convert.hf_gpt2 --from_export=E --hf_dir=H --to_hf
      writes an effjax GPT export as a GPT-2 directory (config.json, model.safetensors, and the tokenizer when it
      is a BPE tokenizer) that `transformers.GPT2LMHeadModel.from_pretrained(H)` loads.

The mapping. GPT-2 uses Conv1D layers whose weight is already [in, out] like a flax kernel; its fused
`attn.c_attn` ([D, 3D]) splits into effjax's query / key / value Dense layers (heads are contiguous column
blocks in both); `attn.c_proj` is effjax's attention `out`, `mlp.c_fc` / `mlp.c_proj` are `mlp/fc` / `mlp/proj`,
`ln_1` / `ln_2` / `ln_f` are `ln1` / `ln2` / `ln_f` (LayerNorm, eps 1e-5), `wte` / `wpe` are the token and
learned position tables, and the head is tied to `wte`. The activation is gelu_new (tanh approximation), which
is flax's `nn.gelu(approximate=True)`. effjax stacks layers on a leading axis when scan_layers=True.

Going to GPT-2, a shared-layer model (model.share_layers='all' or 'groups') is written with its block repeated
in every layer, and a factorized embedding (model.embed_dim) as the product table W·P: the logits are the same.
Architectures GPT-2 cannot express (rotary positions, RMSNorm, post-LN, no biases, structured or doped layers,
other families) are refused with one line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

import numpy as np

from effjax.errors import EffjaxError

SUPPORTED_ACTIVATIONS = ('gelu_new', 'gelu_pytorch_tanh', 'gelu_fast')
LN_EPS = 1e-5


# ----------------------------------------------------------------------------------------------------------
# Reading a Hugging Face directory


def read_hf_config(hf_dir: str) -> dict:
  if not os.path.isdir(hf_dir):
    raise EffjaxError(f'--hf_dir {hf_dir!r} is not a directory')
  path = os.path.join(hf_dir, 'config.json')
  try:
    with open(path, encoding='utf-8') as f:
      cfg = json.load(f)
  except FileNotFoundError:
    raise EffjaxError(f'{hf_dir!r} has no config.json; it is not a Hugging Face model directory') from None
  except (OSError, ValueError) as e:
    raise EffjaxError(f'{path} is unreadable ({e})') from None
  if not isinstance(cfg, dict):
    raise EffjaxError(f'{path} is not a JSON object')
  if cfg.get('model_type', 'gpt2') != 'gpt2':
    raise EffjaxError(f'{path} describes a {cfg.get("model_type")!r} model; only GPT-2 (model_type gpt2) converts')
  return cfg


def _check_hf_config(cfg: dict, where: str) -> None:
  act = cfg.get('activation_function', 'gelu_new')
  problems = []
  if act not in SUPPORTED_ACTIVATIONS:
    problems.append(f'activation_function={act!r} (effjax uses the tanh GELU: {", ".join(SUPPORTED_ACTIVATIONS)})')
  if abs(float(cfg.get('layer_norm_epsilon', LN_EPS)) - LN_EPS) > 1e-12:
    problems.append(f'layer_norm_epsilon={cfg.get("layer_norm_epsilon")} (effjax uses {LN_EPS})')
  if not cfg.get('scale_attn_weights', True):
    problems.append('scale_attn_weights=false')
  if cfg.get('scale_attn_by_inverse_layer_idx', False):
    problems.append('scale_attn_by_inverse_layer_idx=true')
  n_embd, n_inner = int(cfg.get('n_embd', 768)), cfg.get('n_inner')
  if n_inner is not None and int(n_inner) % n_embd:
    problems.append(f'n_inner={n_inner} is not a multiple of n_embd={n_embd}')
  if n_embd % int(cfg.get('n_head', 12)):
    problems.append(f'n_head={cfg.get("n_head")} does not divide n_embd={n_embd}')
  if problems:
    raise EffjaxError(f'{where}: unsupported GPT-2 settings: {"; ".join(problems)}')


def read_hf_weights(hf_dir: str) -> dict[str, np.ndarray]:
  """name -> float32 array, with any 'transformer.' prefix removed."""
  single = os.path.join(hf_dir, 'model.safetensors')
  index = os.path.join(hf_dir, 'model.safetensors.index.json')
  binary = os.path.join(hf_dir, 'pytorch_model.bin')
  tensors = {}
  try:
    if os.path.exists(single) or os.path.exists(index):
      from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel

      if os.path.exists(single):
        files = [single]
      else:
        with open(index, encoding='utf-8') as f:
          files = [os.path.join(hf_dir, n) for n in sorted(set(json.load(f)['weight_map'].values()))]
      for path in files:
        tensors.update(load_file(path))
    elif os.path.exists(binary):
      import torch  # pylint: disable=import-outside-toplevel

      state = torch.load(binary, map_location='cpu', weights_only=True)
      tensors = {k: v.detach().to(torch.float32).numpy() for k, v in state.items() if hasattr(v, 'numpy')}
    else:
      raise EffjaxError(f'{hf_dir!r} has no model.safetensors (or sharded index) or pytorch_model.bin')
  except EffjaxError:
    raise
  except ImportError as e:
    raise EffjaxError(f'reading {hf_dir!r} needs {e.name} (pip install {e.name})') from None
  except Exception as e:  # pylint: disable=broad-except
    raise EffjaxError(
      f'the weights in {hf_dir!r} are unreadable ({type(e).__name__}: '
      f'{str(e).strip().splitlines()[0] if str(e).strip() else ""})'
    ) from None
  out = {}
  for name, value in tensors.items():
    for prefix in ('transformer.', 'model.'):
      if name.startswith(prefix):
        name = name[len(prefix) :]
    out[name] = np.asarray(value, np.float32)
  return out


def effjax_config(hf_cfg: dict, scan_layers: bool = True):
  """configs/base.py get_base() with the model fields of the GPT-2 config."""
  from effjax.configs import base  # pylint: disable=import-outside-toplevel

  n_embd = int(hf_cfg.get('n_embd', 768))
  n_inner = hf_cfg.get('n_inner') or 4 * n_embd
  vocab = int(hf_cfg.get('vocab_size', 50257))
  n_positions = int(hf_cfg.get('n_positions', hf_cfg.get('n_ctx', 1024)))
  c = base.get_base()
  c.model.update(
    family='gpt',
    num_layers=int(hf_cfg.get('n_layer', 12)),
    d_model=n_embd,
    num_heads=int(hf_cfg.get('n_head', 12)),
    vocab_size=vocab,
    max_len=n_positions,
    mlp_ratio=int(n_inner) // n_embd,
    pos_emb='learned',
    use_bias=True,
    norm='layernorm',
    norm_position='pre',
    final_norm=True,
    tie_embeddings=bool(hf_cfg.get('tie_word_embeddings', True)),
    head_bias=False,
    dropout=float(hf_cfg.get('resid_pdrop', 0.0)),
    attn_dropout=float(hf_cfg.get('attn_pdrop', 0.0)),
    scan_layers=bool(scan_layers),
    share_layers='none',
    embed_dim=0,
    mlp_kind='dense',
    attn_kind='dense',
    doping=dict(pattern=''),
  )
  c.data.update(tokenizer='bpe', bpe_vocab_size=vocab, seq_len=min(n_positions, 1024))
  return c


def _take(weights: dict, name: str, shape: tuple, where: str) -> np.ndarray:
  if name not in weights:
    raise EffjaxError(f'{where} has no weight {name!r}; it is not a complete GPT-2 checkpoint')
  value = weights[name]
  if tuple(value.shape) != tuple(shape):
    raise EffjaxError(
      f'{where}: weight {name!r} has shape {tuple(value.shape)}, expected {tuple(shape)} from config.json'
    )
  return value


def hf_to_variables(weights: dict, config, where: str) -> dict:
  """GPT-2 weights -> effjax variables ({'params': ...}) in the layout of config.model.scan_layers."""
  from effjax import state  # pylint: disable=import-outside-toplevel
  from effjax.models import layers  # pylint: disable=import-outside-toplevel

  m = config.model
  d, f, v, p = m.d_model, m.mlp_ratio * m.d_model, m.vocab_size, m.max_len
  take = lambda name, shape: _take(weights, name, shape, where)
  params = {
    'embed': {'embedding': take('wte.weight', (v, d)), 'pos_embedding': take('wpe.weight', (p, d))},
    'ln_f': {'scale': take('ln_f.weight', (d,)), 'bias': take('ln_f.bias', (d,))},
  }
  stack = {}
  for i in range(m.num_layers):
    h = f'h.{i}.'
    qkv_w, qkv_b = take(h + 'attn.c_attn.weight', (d, 3 * d)), take(h + 'attn.c_attn.bias', (3 * d,))
    attn = {
      name: {'kernel': qkv_w[:, j * d : (j + 1) * d], 'bias': qkv_b[j * d : (j + 1) * d]}
      for j, name in enumerate(('query', 'key', 'value'))
    }
    attn['out'] = {'kernel': take(h + 'attn.c_proj.weight', (d, d)), 'bias': take(h + 'attn.c_proj.bias', (d,))}
    stack[f'layer_{i}'] = {
      'attn': attn,
      'mlp': {
        'fc': {'kernel': take(h + 'mlp.c_fc.weight', (d, f)), 'bias': take(h + 'mlp.c_fc.bias', (f,))},
        'proj': {'kernel': take(h + 'mlp.c_proj.weight', (f, d)), 'bias': take(h + 'mlp.c_proj.bias', (d,))},
      },
      'ln1': {'scale': take(h + 'ln_1.weight', (d,)), 'bias': take(h + 'ln_1.bias', (d,))},
      'ln2': {'scale': take(h + 'ln_2.weight', (d,)), 'bias': take(h + 'ln_2.bias', (d,))},
    }
  params['stack'] = layers.stack_layers(stack) if m.scan_layers else stack
  if not m.tie_embeddings:
    params['head'] = {'head': {'kernel': take('lm_head.weight', (v, d)).T}}
  params = {'params': params}
  want = state.abstract_variables(m)
  import jax  # pylint: disable=import-outside-toplevel

  got_shapes = jax.tree.map(lambda x: tuple(x.shape), params)
  want_shapes = jax.tree.map(lambda x: tuple(x.shape), want)
  if got_shapes != want_shapes:
    raise EffjaxError(
      f'{where}: the converted weights do not match the effjax GPT built from its config (an unexpected GPT-2 variant)'
    )
  return jax.tree.map(lambda x: np.ascontiguousarray(x, np.float32), params)


def _tokenizer_file(hf_dir: str, tokenizer: str | None, tmp: str) -> str:
  """Path of a tokenizer.json for the export: --tokenizer, H/tokenizer.json, or built from vocab.json+merges.txt."""
  if tokenizer:
    if not os.path.isfile(tokenizer):
      raise EffjaxError(f'--tokenizer {tokenizer!r} does not exist')
    return tokenizer
  path = os.path.join(hf_dir, 'tokenizer.json')
  if os.path.isfile(path):
    return path
  vocab, merges = os.path.join(hf_dir, 'vocab.json'), os.path.join(hf_dir, 'merges.txt')
  if os.path.isfile(vocab) and os.path.isfile(merges):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # pylint: disable=import-outside-toplevel

    try:
      tok = Tokenizer(models.BPE.from_file(vocab, merges))
    except Exception as e:  # pylint: disable=broad-except
      raise EffjaxError(f'vocab.json / merges.txt in {hf_dir!r} are unreadable ({e})') from None
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    out = os.path.join(tmp, 'tokenizer.json')
    with open(out, 'w', encoding='utf-8') as f:
      f.write(tok.to_str())
    return out
  raise EffjaxError(
    f'{hf_dir!r} has no tokenizer (tokenizer.json, or vocab.json + merges.txt); pass --tokenizer=PATH/tokenizer.json'
  )


def import_hf(
  hf_dir: str, export_dir: str, *, scan_layers: bool = True, dtype: str = 'float32', tokenizer: str | None = None
) -> str:
  """A local GPT-2 directory -> an effjax export (returns its path). Nothing is written if anything fails."""
  import effjax  # pylint: disable=import-outside-toplevel
  from effjax import accounting, checkpoint  # pylint: disable=import-outside-toplevel
  from effjax.data import tokenizers  # pylint: disable=import-outside-toplevel

  checkpoint.check_new_dir(export_dir, 'export_dir')
  hf_cfg = read_hf_config(hf_dir)
  _check_hf_config(hf_cfg, os.path.join(hf_dir, 'config.json'))
  config = effjax_config(hf_cfg, scan_layers)
  variables = hf_to_variables(read_hf_weights(hf_dir), config, hf_dir)
  with tempfile.TemporaryDirectory() as tmp:
    tok_path = _tokenizer_file(hf_dir, tokenizer, tmp)
    if tok_path != os.path.join(tmp, 'tokenizer.json'):
      shutil.copyfile(tok_path, os.path.join(tmp, 'tokenizer.json'))
    tok = tokenizers.load_tokenizer(tmp)
    if tok.vocab_size > config.model.vocab_size:
      raise EffjaxError(f'the tokenizer has {tok.vocab_size} tokens but the model only {config.model.vocab_size}')
    config.data.tokenizer = tok.kind
    metadata = {
      'effjax_version': effjax.__version__,
      'step': None,
      'tokens_seen': None,
      'tokenizer': tok.kind,
      'source': f'hf_gpt2:{os.path.abspath(hf_dir)}',
      **accounting.param_counts(config.model),
    }
    return checkpoint.export(export_dir, variables, config, os.path.join(tmp, 'tokenizer.json'), metadata, dtype)


# ----------------------------------------------------------------------------------------------------------
# Writing a Hugging Face directory


def _check_exportable(m) -> None:
  problems = []
  wants = {
    'family': 'gpt',
    'pos_emb': 'learned',
    'norm': 'layernorm',
    'norm_position': 'pre',
    'final_norm': True,
    'use_bias': True,
    'mlp_kind': 'dense',
    'attn_kind': 'dense',
  }
  for key, value in wants.items():
    if m.get(key, value) != value:
      problems.append(f'model.{key}={m.get(key)!r} (GPT-2 needs {value!r})')
  doping = (m.get('doping') or {}).get('pattern', '')
  if doping:
    problems.append(f'model.doping.pattern={doping!r} (GPT-2 has no frozen MLP layers)')
  if not m.tie_embeddings and m.get('head_bias', False):
    problems.append("model.head_bias=True (GPT-2's lm_head has no bias)")
  if problems:
    raise EffjaxError(f'this export cannot be written as GPT-2: {"; ".join(problems)}')


def _layer_params(stack: dict, m, i: int) -> dict:
  """Block params of layer i from an unscanned stack (layer_i, shared, or group_g)."""
  if m.share_layers == 'all':
    return stack['shared']
  if m.share_layers == 'groups':
    return stack[f'group_{i // (m.num_layers // m.num_groups)}']
  return stack[f'layer_{i}']


def variables_to_hf(variables: dict, m) -> dict[str, np.ndarray]:
  import jax  # pylint: disable=import-outside-toplevel
  from effjax.models import layers  # pylint: disable=import-outside-toplevel

  params = jax.tree.map(lambda x: np.asarray(x, np.float32), jax.device_get(variables['params']))
  stack = layers.unstack_layers(params['stack']) if m.scan_layers else params['stack']
  table = params['embed']['embedding']
  if m.embed_dim:
    table = table @ params['embed']['projection']  # the tied head h·Pᵀ·Wᵀ = h·(W·P)ᵀ
  out = {
    'wte.weight': table,
    'wpe.weight': params['embed']['pos_embedding'],
    'ln_f.weight': params['ln_f']['scale'],
    'ln_f.bias': params['ln_f']['bias'],
  }
  for i in range(m.num_layers):
    blk, h = _layer_params(stack, m, i), f'h.{i}.'
    a = blk['attn']
    out[h + 'attn.c_attn.weight'] = np.concatenate([a[n]['kernel'] for n in ('query', 'key', 'value')], axis=1)
    out[h + 'attn.c_attn.bias'] = np.concatenate([a[n]['bias'] for n in ('query', 'key', 'value')])
    out[h + 'attn.c_proj.weight'], out[h + 'attn.c_proj.bias'] = a['out']['kernel'], a['out']['bias']
    out[h + 'mlp.c_fc.weight'], out[h + 'mlp.c_fc.bias'] = blk['mlp']['fc']['kernel'], blk['mlp']['fc']['bias']
    out[h + 'mlp.c_proj.weight'] = blk['mlp']['proj']['kernel']
    out[h + 'mlp.c_proj.bias'] = blk['mlp']['proj']['bias']
    for ln, name in (('ln1', 'ln_1'), ('ln2', 'ln_2')):
      out[h + f'{name}.weight'], out[h + f'{name}.bias'] = blk[ln]['scale'], blk[ln]['bias']
  tensors = {f'transformer.{k}': np.ascontiguousarray(v) for k, v in out.items()}
  if not m.tie_embeddings:
    tensors['lm_head.weight'] = np.ascontiguousarray(params['head']['head']['kernel'].T)
  return tensors


def hf_config_dict(m, eos_id: int | None) -> dict:
  return {
    'architectures': ['GPT2LMHeadModel'],
    'model_type': 'gpt2',
    'activation_function': 'gelu_new',
    'n_embd': m.d_model,
    'n_layer': m.num_layers,
    'n_head': m.num_heads,
    'n_positions': m.max_len,
    'n_ctx': m.max_len,
    'n_inner': m.mlp_ratio * m.d_model,
    'vocab_size': m.vocab_size,
    'layer_norm_epsilon': LN_EPS,
    'resid_pdrop': float(m.dropout),
    'embd_pdrop': float(m.dropout),
    'attn_pdrop': float(m.attn_dropout),
    'initializer_range': 0.02,
    'scale_attn_weights': True,
    'scale_attn_by_inverse_layer_idx': False,
    'reorder_and_upcast_attn': False,
    'use_cache': True,
    'tie_word_embeddings': bool(m.tie_embeddings),
    'bos_token_id': eos_id,
    'eos_token_id': eos_id,
    'torch_dtype': 'float32',
  }


def export_to_hf(export_dir: str, hf_dir: str) -> tuple[str, bool]:
  """An effjax export -> a GPT-2 directory. Returns (path, whether a tokenizer.json was written)."""
  from effjax import checkpoint  # pylint: disable=import-outside-toplevel
  from effjax.data import tokenizers  # pylint: disable=import-outside-toplevel

  hf_dir = checkpoint.check_new_dir(hf_dir, '--hf_dir')
  _, variables, config = checkpoint.load_export(export_dir)
  m = config.model
  _check_exportable(m)
  tok = tokenizers.load_tokenizer(export_dir)
  eos_id = None
  if tok.kind == 'bpe':
    eos_id = tok.tok.token_to_id('<|endoftext|>')
  try:
    from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise EffjaxError('writing a Hugging Face directory needs safetensors (pip install safetensors)') from None
  tensors = variables_to_hf(variables, m)
  tmp = f'{hf_dir}.tmp-{os.getpid()}'
  try:
    os.makedirs(tmp)
  except OSError as e:
    raise EffjaxError(f'--hf_dir {hf_dir!r} is not writable ({e.strerror})') from None
  try:
    save_file(tensors, os.path.join(tmp, 'model.safetensors'), metadata={'format': 'pt'})
    checkpoint.write_json_atomic(os.path.join(tmp, 'config.json'), hf_config_dict(m, eos_id))
    wrote_tokenizer = tok.kind == 'bpe'
    if wrote_tokenizer:
      shutil.copyfile(os.path.join(export_dir, 'tokenizer.json'), os.path.join(tmp, 'tokenizer.json'))
    checkpoint._publish(tmp, hf_dir)  # pylint: disable=protected-access
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return hf_dir, wrote_tokenizer


# ----------------------------------------------------------------------------------------------------------
# Command line


class _Parser(argparse.ArgumentParser):
  def error(self, message):
    print(f'effjax: error: {message}', file=sys.stderr)
    sys.exit(2)


def parse_args(argv):
  p = _Parser(prog='python -m effjax.convert.hf_gpt2', description=__doc__.split('\n\n')[0])
  p.add_argument('--hf_dir', required=True, help='the Hugging Face GPT-2 directory (read, or written with --to_hf)')
  p.add_argument('--export_dir', help='import: the effjax export to write')
  p.add_argument('--from_export', help='--to_hf: the effjax export to convert')
  p.add_argument('--to_hf', action='store_true', help='write --from_export as a GPT-2 directory at --hf_dir')
  p.add_argument(
    '--scan_layers',
    action=argparse.BooleanOptionalAction,
    default=True,
    help='import: stack layers on a leading axis (default) or keep them as layer_i',
  )
  p.add_argument('--dtype', choices=['float32', 'bfloat16'], default='float32', help='import: parameter dtype')
  p.add_argument('--tokenizer', help='import: a tokenizer.json to use instead of the one in --hf_dir')
  args = p.parse_args(argv)
  if args.to_hf and not args.from_export:
    p.error('--to_hf needs --from_export=E (the effjax export to convert)')
  if not args.to_hf and not args.export_dir:
    p.error('importing needs --export_dir=E (or write an export as GPT-2 with --from_export=E --to_hf)')
  if not args.to_hf and args.from_export:
    p.error('--from_export is for --to_hf; to import, pass --hf_dir and --export_dir')
  return args


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  try:
    if args.to_hf:
      path, wrote_tokenizer = export_to_hf(args.from_export, args.hf_dir)
      note = '' if wrote_tokenizer else " (no tokenizer.json: the export's char/byte tokenizer has no GPT-2 form)"
      print(f'wrote GPT-2 directory {path}{note}')
    else:
      path = import_hf(
        args.hf_dir, args.export_dir, scan_layers=args.scan_layers, dtype=args.dtype, tokenizer=args.tokenizer
      )
      print(f'wrote effjax export {path}')
  except EffjaxError as e:
    print(f'effjax: error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
