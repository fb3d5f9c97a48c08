"""Shared defaults for every variant. Variant files start from `get_base()` and change what they need.

Presets: `tiny` (tests and smoke runs, well under a minute on 2 CPU cores), the default (a few CPU minutes,
samples recognisable Python) and `paper` (the seed paper's own configuration; used with --mode=summary).
"""

import ml_collections

# Logical axis name -> mesh axes, in priority order. Changing the parallelism strategy touches only this table.
# flax gives each dimension the first rule of its name whose mesh axes are still free in that array, so a name
# may have fallbacks: the (mlp,) bias alone takes ('tensor', 'fsdp'), the (embed, mlp) kernel, whose embed dim
# took fsdp first, falls back to 'tensor'. Mesh axes of size 1, or that do not divide a dimension, are dropped
# (effjax.sharding._fit), so one table serves every mesh: the mesh sizes choose the strategy.
#   FSDP_TP_RULES (default)  data x fsdp x tensor: batch over data*fsdp; every parameter sharded over fsdp
#                            (ZeRO-3: params, grads and Adam moments), heads/mlp/vocab dims over tensor (Megatron).
#                            mesh data=-1 alone is pure data parallel, fsdp=-1 pure FSDP.
#   FSDP_RULES               no tensor parallelism: every parameter sharded over fsdp, batch over all axes.
#   DP_RULES                 pure data parallel on any mesh: params replicated, batch over all axes.
# Pick one in a config with `c.mesh.rules = base.RULE_SETS['dp']`, or on the command line with
# --config.mesh.rules="(('batch', ('data', 'fsdp', 'tensor')),)" (a name without a rule is replicated).
FSDP_TP_RULES = (
  ('batch', ('data', 'fsdp')),
  ('embed', 'fsdp'),
  ('factor', 'fsdp'),  # the E axis of a factorized V x E table
  ('mlp', ('tensor', 'fsdp')),
  ('mlp', 'tensor'),
  ('heads', ('tensor', 'fsdp')),
  ('heads', 'tensor'),
  ('vocab', ('tensor', 'fsdp')),
  ('vocab', 'tensor'),
  ('branch', None),
  ('layers', None),
)
FSDP_RULES = (
  ('batch', ('data', 'fsdp', 'tensor')),
  ('embed', 'fsdp'),
  ('factor', 'fsdp'),
  ('mlp', 'fsdp'),
  ('heads', 'fsdp'),
  ('vocab', 'fsdp'),
  ('branch', None),
  ('layers', None),
)
DP_RULES = (('batch', ('data', 'fsdp', 'tensor')),)
RULE_SETS = {'fsdp_tp': FSDP_TP_RULES, 'fsdp': FSDP_RULES, 'dp': DP_RULES}
DEFAULT_RULES = FSDP_TP_RULES


# Keys of the flat `model` namespace of older effjax -> where they live now. A config.json or a checkpoint's
# recorded architecture written with them is migrated on read (effjax.checkpoint.migrate_model).
MOVED_MODEL_KEYS = {
  'num_branches': 'pgpt.num_branches',
  'branch_input': 'pgpt.branch_input',
  'active_branches': 'pgpt.active_branches',
  'branch_mix': 'pgpt.branch_mix',
  'branch_impl': 'pgpt.branch_impl',
  'compress_every': 'compress.compress_every',
  'compress_factor': 'compress.compress_factor',
  'conv_kernel': 'compress.conv_kernel',
  'doping': 'doping.pattern',
  'frozen_mlp_ratio': 'doping.frozen_mlp_ratio',
  'num_blocks': 'dense.num_blocks',
  'blockdiag_mix': 'dense.blockdiag_mix',
  'lowrank_rank': 'dense.lowrank_rank',
}


def section(**defaults) -> ml_collections.ConfigDict:
  """One family's or dense kind's own keys under config.model (`--config.model.pgpt.num_branches=4`)."""
  return ml_collections.ConfigDict(defaults)


def model_section() -> ml_collections.ConfigDict:
  """config.model: the stack every family shares, then one section per family or dense kind."""
  m = ml_collections.ConfigDict()
  m.family = 'gpt'
  m.num_layers = 4
  m.d_model = 128
  m.num_heads = 4
  m.vocab_size = 0  # 0: taken from the tokenizer
  m.max_len = 128  # longest sequence (learned-position table size, KV-cache length)
  m.mlp_ratio = 4  # MLP hidden width = mlp_ratio * d_model
  m.pos_emb = 'learned'  # 'learned' | 'rotary' | 'none'
  m.rope_base = 10000.0
  m.dropout = 0.0
  m.attn_dropout = 0.0
  m.use_bias = True
  m.norm = 'layernorm'  # 'layernorm' | 'rmsnorm'
  m.norm_position = 'pre'  # 'pre' (GPT-2) | 'post' (original transformer)
  m.final_norm = True
  m.tie_embeddings = True
  m.head_bias = False  # bias on an untied output head
  m.param_dtype = 'float32'
  m.dtype = 'float32'  # compute dtype; 'bfloat16' on accelerators
  m.remat = 'none'  # 'none' | 'full' | 'dots_saveable'
  m.scan_layers = True
  m.scan_unroll = -1  # layers per scan iteration (0: all; -1: by backend and depth); see layers.scan_unroll
  m.attention_impl = 'xla'  # 'xla' | 'cudnn' (GPU only)
  # GPT-Efficio
  m.share_layers = 'none'  # 'none' | 'all' | 'groups'
  m.num_groups = 1
  m.embed_dim = 0  # factorized embedding width E; 0 = no factorization
  # structured / doped layers
  m.mlp_kind = 'dense'  # a dense kind: 'dense' | 'fastfood' | 'blockdiag' | ... (structured.kinds())
  m.attn_kind = 'dense'
  m.dense = section(  # the dense kinds' options (structured.DenseKind.config_keys); a kind defined outside
    # effjax/models/structured.py adds its own in its config file (configs/lowrank.py)
    num_blocks=4,  # blocks of the block-diagonal layers
    blockdiag_mix='each',  # 'each' | 'expanding' (seed 004 Fig. 5: one block-Hadamard per MLP)
  )
  m.doping = section(  # frozen random MLPs between trainable blocks (effjax/models/doped.py)
    pattern='',  # '', 'interleave' or a pattern such as 'TFTFT' (T trainable block, F frozen MLP);
    # num_layers counts the T's
    frozen_mlp_ratio=6,  # frozen MLP hidden width = frozen_mlp_ratio * d_model
  )
  m.pgpt = section(  # p-gpt (effjax/models/parallel.py)
    num_branches=2,
    branch_input='project',  # 'split' | 'project'
    active_branches=(),  # empty: all branches
    branch_mix='softmax',  # 'softmax' (P logits) | 'scalar' (one w: w, 1 - w; the authors' code)
    branch_impl='vmap',  # 'vmap' (one vectorised stack) | 'loop' (P stacks, Python loop; reference)
  )
  m.compress = section(  # lc-gpt / cc-gpt (effjax/models/compressed.py)
    compress_every=2,  # a compressor after every n blocks
    compress_factor=2,  # ... divides the width by f
    conv_kernel=1,  # cc-gpt's causal Conv1d kernel
  )
  return m


def data_section() -> ml_collections.ConfigDict:
  """config.data: where the tokens come from."""
  d = ml_collections.ConfigDict()
  d.dataset = ''  # a prepared dataset dir (python -m effjax.data.prepare), local or gs://; it wins over
  # the keys below, which otherwise make the workdir's own dataset (prepared implicitly)
  d.corpus = 'embedded'
  d.tokenizer = 'char'
  d.bpe_vocab_size = 4096
  d.seq_len = 128
  d.max_bytes = 4_000_000
  d.val_fraction = 0.05
  d.text_field = 'text'
  return d


def train_section() -> ml_collections.ConfigDict:
  """config.train: the optimizer, schedule, logging and run-time switches."""
  t = ml_collections.ConfigDict()
  t.steps = 1000
  t.stop_at = 0  # end this run early at this step (checkpointed); the schedule still spans `steps`
  t.batch_size = 16
  t.grad_accum = 1
  t.lr = 1e-3
  t.lr_schedule = 'cosine'  # 'cosine' | 'constant'
  t.warmup_steps = 100
  t.min_lr_ratio = 0.1
  t.weight_decay = 0.1
  t.decay_embeddings = False
  t.b1 = 0.9
  t.b2 = 0.95
  t.eps = 1e-8
  t.grad_clip = 1.0
  t.log_every = 50
  t.eval_every = 250
  t.eval_batches = 8
  t.wandb_project = ''  # also log to this Weights & Biases project (pip install 'effjax[wandb]')
  t.require_backend = ''  # 'gpu' / 'tpu': stop in one line if jax's backend is another (effjax/accelerator.py)
  t.compile_cache_dir = 'auto'  # persistent compilation cache: 'auto' = DIR/compile_cache on GPU/TPU; '' = off
  t.profile_steps = (0, 0)  # (first, last): a jax.profiler trace of these steps in DIR/profile
  return t


def checkpoint_section() -> ml_collections.ConfigDict:
  """config.checkpoint: how often and how many, and what a resume may differ in."""
  k = ml_collections.ConfigDict()
  k.every = 250
  k.keep = 3
  k.allow_other_data = False  # resume on data (fingerprint, tokenizer) other than the checkpoint's, on purpose
  return k


def mesh_section() -> ml_collections.ConfigDict:
  """config.mesh: the device mesh axes and the logical-to-mesh sharding rules."""
  mesh = ml_collections.ConfigDict()
  mesh.data = -1
  mesh.fsdp = 1
  mesh.tensor = 1
  mesh.rules = DEFAULT_RULES
  # XLA:CPU devices of a single-process training run: 0 = one per core (effjax.sharding.cpu_device_count), so
  # the data axis runs a shard of the batch on each core; 1 = one device using all cores for every op.
  mesh.cpu_devices = 0
  return mesh


def get_base() -> ml_collections.ConfigDict:
  """Every key a run has, at its default; a variant's get_config changes some of them."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = model_section()
  c.data = data_section()
  c.train = train_section()
  c.checkpoint = checkpoint_section()
  c.mesh = mesh_section()
  return c


def unknown_preset(variant: str, preset: str, valid) -> None:
  from effjax.errors import EffjaxError

  raise EffjaxError(
    f"unknown preset {preset!r} for configs/{variant}.py; valid presets: '' (default), {', '.join(map(repr, valid))}"
  )
