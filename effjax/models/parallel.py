"""p-gpt (ParallelGPT, arXiv 2404.14462): P independent decoder stacks of L/P blocks run side by side and are
mixed by learned weights before the output head (config.model.pgpt.branch_mix):
  'softmax'  y = Σ_i softmax(w)_i · y_i over P learned logits (the default);
  'scalar'   the authors' paper-era code (two branches): y = w · y_0 + (1 - w) · y_1 with one learned w.

Two ways to feed the branches (config.model.pgpt.branch_input):
  'split'    the paper's code: one embedding P·d wide (token and position tables), cut channel-wise into P
             d-wide slices, slice i feeding branch i.
  'project'  the later form of the seed's formula h_i = P_i(x): one shared d-wide embedding and a d×d projection
             P_i (with bias) at the start of every branch.
Selective inference: config.model.pgpt.active_branches (empty = all) runs only those branches. With 'softmax' the
weights are renormalised over them, so one active branch is exactly that branch alone with weight 1 ("p-gpt-1");
with 'scalar' each branch keeps its trained weight, the authors' p-gpt-1 rule (keep the branch whose weight is
>= 0.5, `strongest_branch`, scaled by that weight).

The branches are one vectorised stack (`nn.vmap` over a leading 'branch' param axis, each branch a
`layers.LayerStack`): params/branches/stack/layers/... have shape [P, L/P, ...]. A subset runs on a gathered
[k, ...] view of those params, so inactive branches cost nothing. `model.pgpt.branch_impl='loop'` builds the same
network as P separately named stacks applied in a Python loop (params/branch_{i}/...), kept for the
vectorised-vs-loop measurement (experiments/pgpt_table.py) and as a numerical reference.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from effjax import models
from effjax.errors import EffjaxError
from effjax.models import layers


def branch_impl(cfg) -> str:
  return cfg.pgpt.get('branch_impl', 'vmap')


def branch_mix(cfg) -> str:
  return cfg.pgpt.get('branch_mix', 'softmax')


def branch_weights(params: dict) -> np.ndarray:
  """The trained mixing weights of all branches (softmax of the logits, or (w, 1 - w))."""
  if 'branch_weight' in params:
    w = float(params['branch_weight'])
    return np.asarray([w, 1.0 - w])
  return np.asarray(jax.nn.softmax(jnp.asarray(params['branch_logits'], jnp.float32)))


def strongest_branch(params: dict) -> int:
  """The authors' p-gpt-1 choice: the branch whose trained weight is largest (>= 0.5 with two branches)."""
  return int(np.argmax(branch_weights(params)))


def active_indices(cfg) -> tuple[int, ...]:
  """The running branches in increasing order (config order does not matter); empty config = all."""
  active = tuple(cfg.pgpt.active_branches) if cfg.pgpt.active_branches else tuple(range(cfg.pgpt.num_branches))
  return tuple(sorted(int(i) for i in active))


class Branch(nn.Module):
  """One branch: (project form) a d×d projection, then L/P blocks through the shared LayerStack."""

  cfg: layers.Config
  train: bool = False
  decode: bool = False

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, positions_T: jax.Array) -> jax.Array:
    cfg = self.cfg
    if cfg.pgpt.branch_input == 'project':
      x_BxTxD = nn.Dense(
        cfg.d_model,
        use_bias=cfg.use_bias,
        dtype=layers.dtype_of(cfg.dtype),
        param_dtype=layers.dtype_of(cfg.param_dtype),
        kernel_init=layers.normal_init(layers.INIT_STD, ('embed', None)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,)),
        name='proj',
      )(x_BxTxD)
    depth = cfg.num_layers // cfg.pgpt.num_branches
    return layers.LayerStack(
      block_cls=layers.Block,
      block_kwargs=dict(
        cfg=cfg, d_model=cfg.d_model, num_heads=cfg.num_heads, num_layers=depth, train=self.train, decode=self.decode
      ),
      num_layers=depth,
      scan=cfg.scan_layers,
      share=cfg.share_layers,
      num_groups=cfg.num_groups,
      remat=cfg.remat,
      name='stack',
    )(x_BxTxD, positions_T)


def _vmapped_branches(size: int):
  """`Branch` vectorised over a leading branch axis of `size`: params [size, ...] named 'branch', per-branch
  init and dropout keys, and a per-branch KV cache."""
  return nn.vmap(
    Branch,
    variable_axes={c: 0 for c in layers.PER_LAYER_COLLECTIONS},
    split_rngs={'params': True, 'dropout': True},
    in_axes=(0, None),
    axis_size=size,
    metadata_params={nn.PARTITION_NAME: 'branch'},
  )


def _gather(indices: tuple[int, ...], tree):
  idx = np.asarray(indices)
  return jax.tree.map(lambda x: x[idx], tree)


class ParallelGPT(layers.LanguageModel):
  """The trunk: P branches of L/P blocks on the embedding (split: branch i reads channel slice i of a P·d-wide
  one), mixed by learned weights (model.pgpt.branch_mix)."""

  def embed_width(self) -> int:
    own = self.cfg.pgpt
    return own.num_branches * self.cfg.d_model if own.branch_input == 'split' else self.cfg.d_model

  def head_ties(self) -> bool:
    return self.cfg.pgpt.branch_input != 'split'

  def trunk(self, x_BxTxE: jax.Array, positions_T: jax.Array, train: bool, decode: bool) -> jax.Array:
    cfg = self.cfg
    p, d = cfg.pgpt.num_branches, cfg.d_model
    active = active_indices(cfg)
    if cfg.pgpt.branch_input == 'split':  # channel slice i of the P·d-wide embedding feeds branch i
      b, t, _ = x_BxTxE.shape
      x_PxBxTxD = jnp.moveaxis(x_BxTxE.reshape(b, t, p, d), 2, 0)
    else:
      x_PxBxTxD = jnp.broadcast_to(x_BxTxE[None], (p, *x_BxTxE.shape))

    if branch_impl(cfg) == 'loop':
      run = range(p) if self.is_initializing() and not decode else active  # init creates every branch
      y = {i: Branch(cfg, train, decode, name=f'branch_{i}')(x_PxBxTxD[i], positions_T) for i in run}
      y_KxBxTxD = jnp.stack([y[i] for i in active])
    else:
      y_KxBxTxD = self._vectorised(x_PxBxTxD, positions_T, active, train, decode)

    alpha_K = self._mixing_weights(active)
    return jnp.einsum('k,kbtd->btd', alpha_K.astype(y_KxBxTxD.dtype), y_KxBxTxD)

  def _mixing_weights(self, active) -> jax.Array:
    """softmax: softmax of P logits over the active branches (renormalised: one branch gets weight 1).
    scalar: (w, 1 - w) from one learned w (init 0.5), each active branch keeping its own weight."""
    cfg = self.cfg
    if branch_mix(cfg) == 'scalar':
      w = self.param(
        'branch_weight',
        nn.with_logical_partitioning(nn.initializers.constant(0.5), ()),
        (),
        layers.dtype_of(cfg.param_dtype),
      ).astype(jnp.float32)
      return jnp.stack([w, 1.0 - w])[np.asarray(active)]
    w_P = self.param(
      'branch_logits',
      nn.with_logical_partitioning(nn.initializers.zeros_init(), ('branch',)),
      (cfg.pgpt.num_branches,),
      layers.dtype_of(cfg.param_dtype),
    )
    return jax.nn.softmax(w_P[np.asarray(active)].astype(jnp.float32))

  def _vectorised(self, x_PxBxTxD, positions_T, active, train, decode):
    """All branches in one vmapped stack; a subset runs on gathered params (and, decoding, its own cache).

    Initialising creates every branch's params (the whole network), except for a decode init with a subset,
    which only needs (and only creates) the active branches' KV cache.
    """
    p, k = self.cfg.pgpt.num_branches, len(active)
    if k == p or (self.is_initializing() and not decode):
      y_PxBxTxD = _vmapped_branches(p)(self.cfg, train, decode, name='branches')(x_PxBxTxD, positions_T)
      return y_PxBxTxD if k == p else _gather(active, y_PxBxTxD)
    x_KxBxTxD = _gather(active, x_PxBxTxD)
    if self.is_initializing():  # decode init for a subset: the cache of the k active branches
      return _vmapped_branches(k)(self.cfg, train, decode, name='branches')(x_KxBxTxD, positions_T)
    subset = nn.map_variables(_vmapped_branches(k), 'params', trans_in_fn=functools.partial(_gather, active))
    return subset(self.cfg, train, decode, name='branches')(x_KxBxTxD, positions_T)

  @staticmethod
  def param_keys(cfg) -> tuple[str, ...]:
    own = ('num_branches', 'branch_input', 'branch_impl', 'branch_mix')  # active_branches: a runtime choice
    return layers.param_keys(cfg) + tuple(f'pgpt.{k}' for k in own)

  @staticmethod
  def forward_flops_per_token(cfg, seq_len: int) -> int:
    """Only active branches cost anything: k·(L/P) blocks (+ k projections in the project form) and the head."""
    k = len(active_indices(cfg))
    depth = cfg.num_layers // cfg.pgpt.num_branches
    per_branch = depth * layers.block_forward_flops(cfg, cfg.d_model, seq_len)
    if cfg.pgpt.branch_input == 'project':
      per_branch += 2 * cfg.d_model * cfg.d_model
    head = 2 * cfg.d_model * cfg.vocab_size
    split = cfg.pgpt.branch_input == 'split'
    factor_in = 2 * cfg.embed_dim * cfg.d_model * (cfg.pgpt.num_branches if split else 1)
    return int(k * per_branch + head + (factor_in if cfg.embed_dim else 0))

  @staticmethod
  def summary_extras(cfg, abstract_variables) -> dict:
    """Params a forward pass with the active branches uses (the paper's p-gpt-1 count for one branch): the
    total less the inactive branches' stacks (and projections). The split form's P·d-wide tables stay whole,
    as in the paper's count; `active_params_sliced_embedding` also drops the inactive branches' columns."""
    params = abstract_variables.get('params', {})
    count = lambda tree: int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))
    total = count(params) + count(abstract_variables.get('frozen', {}))
    p = cfg.pgpt.num_branches
    if branch_impl(cfg) == 'loop':
      branch_total = sum(count(params.get(f'branch_{i}', {})) for i in range(p))
    else:
      branch_total = count(params.get('branches', {}))
    per_branch = branch_total // p
    k = len(active_indices(cfg))
    active = total - (p - k) * per_branch
    one = total - (p - 1) * per_branch
    embed = params.get('embed', {})
    tables = count(embed.get('embedding', ())) + count(embed.get('pos_embedding', ()))
    inactive_columns = (p - k) * tables // p if cfg.pgpt.branch_input == 'split' and not cfg.embed_dim else 0
    return {
      'num_branches': p,
      'branch_input': cfg.pgpt.branch_input,
      'active_branches': list(active_indices(cfg)),
      'params_per_branch': per_branch,
      'active_params': active,
      'active_param_mb': round(active * 4 / 2**20, 2),
      'single_branch_params': one,
      'single_branch_param_mb': round(one * 4 / 2**20, 2),
      'active_params_sliced_embedding': active - inactive_columns,
    }


def stack_branches(params: dict) -> dict:
  """Loop layout (branch_{i}/...) -> vectorised layout (branches/... with a leading branch axis)."""
  names = sorted((k for k in params if k.startswith('branch_') and k[7:].isdigit()), key=lambda k: int(k[7:]))
  if not names:
    return dict(params)
  out = {k: v for k, v in params.items() if k not in names}
  out['branches'] = jax.tree.map(lambda *xs: jnp.stack(xs), *(params[k] for k in names))
  return out


def unstack_branches(params: dict) -> dict:
  """Vectorised layout -> loop layout: branches/X[P, ...] -> branch_{i}/X."""
  if 'branches' not in params:
    return dict(params)
  out = {k: v for k, v in params.items() if k != 'branches'}
  n = jax.tree.leaves(params['branches'])[0].shape[0]
  out.update({f'branch_{i}': jax.tree.map(lambda x, i=i: x[i], params['branches']) for i in range(n)})
  return out


def check(m) -> None:
  """p-gpt's config checks (run by validate.check_model_config through the family entry)."""
  if m.pgpt.branch_input not in ('split', 'project'):
    raise EffjaxError(f'model.pgpt.branch_input={m.pgpt.branch_input!r} is invalid; valid values: split, project')
  p = m.pgpt.num_branches
  if not isinstance(p, int) or isinstance(p, bool) or p < 2:
    raise EffjaxError(f'model.pgpt.num_branches={p!r} is invalid; p-gpt needs an integer >= 2')
  if m.num_layers % p:
    raise EffjaxError(
      f'model.pgpt.num_branches={p} does not divide model.num_layers={m.num_layers}; each of the '
      'P branches has num_layers/P blocks'
    )
  if branch_mix(m) not in ('softmax', 'scalar'):
    raise EffjaxError(f'model.pgpt.branch_mix={m.pgpt.branch_mix!r} is invalid; valid values: softmax, scalar')
  if branch_mix(m) == 'scalar' and p != 2:
    raise EffjaxError(
      f"model.pgpt.branch_mix='scalar' mixes two branches (w, 1 - w); model.pgpt.num_branches={p}: "
      "use 2 or branch_mix='softmax'"
    )
  if branch_impl(m) not in ('vmap', 'loop'):
    raise EffjaxError(f'model.pgpt.branch_impl={m.pgpt.branch_impl!r} is invalid; valid values: vmap, loop')
  active = m.pgpt.active_branches
  if (
    isinstance(active, int)
    or not isinstance(active, (tuple, list))
    or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < p for i in active)
    or len(set(active)) != len(active)
  ):
    raise EffjaxError(
      f'model.pgpt.active_branches={active!r} is invalid; give distinct branch indices in 0..{p - 1} '
      "as a tuple, e.g. '(0,)', or () for all branches"
    )
  if m.pgpt.branch_input == 'split' and m.tie_embeddings:
    raise EffjaxError(
      f'model.tie_embeddings=True does not fit branch_input=split (the embedding is '
      f'num_branches*d_model={p * m.d_model} wide, the head reads d_model={m.d_model}); use '
      "tie_embeddings=False or branch_input='project'"
    )
  if m.share_layers == 'groups' and (m.num_layers // p) % m.num_groups:
    raise EffjaxError(
      f'model.num_groups={m.num_groups} does not divide the {m.num_layers // p} blocks of each '
      'p-gpt branch (num_layers/num_branches)'
    )


models.register_family(
  models.Family(
    'pgpt',
    ParallelGPT,
    forward_flops=ParallelGPT.forward_flops_per_token,
    check=check,
    param_keys=ParallelGPT.param_keys,
    summary_extras=ParallelGPT.summary_extras,
    memory_extra_bytes=lambda cfg, a: cfg.pgpt.num_branches * cfg.d_model * a,  # the P branch outputs before mixing
    outside_params=('embed', 'head', 'ln_f', 'branch_logits', 'branch_weight'),
  )
)
