"""GPT and GPT-Efficio: a decoder-only transformer whose layer stack may share parameters across layers
(config.model.share_layers) and whose embedding may be factorized (config.model.embed_dim)."""

from __future__ import annotations

import math

import jax

from effjax import models
from effjax.models import doped, layers


class GPT(layers.LanguageModel):
  """The trunk: one LayerStack of num_layers blocks (or the doped stack)."""

  def trunk(self, x_BxTxD: jax.Array, positions_T: jax.Array, train: bool, decode: bool) -> jax.Array:
    cfg = self.cfg
    if doped.doping(cfg):  # frozen random MLPs between trainable blocks (effjax/models/doped.py)
      stack = doped.DopedStack(cfg, train=train, decode=decode, name='stack')
    else:
      stack = layers.LayerStack(
        block_cls=layers.Block,
        block_kwargs=dict(
          cfg=cfg, d_model=cfg.d_model, num_heads=cfg.num_heads, num_layers=cfg.num_layers, train=train, decode=decode
        ),
        num_layers=cfg.num_layers,
        scan=cfg.scan_layers,
        share=cfg.share_layers,
        num_groups=cfg.num_groups,
        remat=cfg.remat,
        name='stack',
      )
    return stack(x_BxTxD, positions_T)

  @staticmethod
  def param_keys(cfg) -> tuple[str, ...]:
    return layers.param_keys(cfg) + doped.param_keys(cfg)

  @staticmethod
  def forward_flops_per_token(cfg, seq_len: int) -> int:
    """A shared block costs as much per application as an independent one: FLOPs grow with L either way."""
    return (
      layers.embed_forward_flops(cfg, cfg.d_model)
      + cfg.num_layers * layers.block_forward_flops(cfg, cfg.d_model, seq_len)
      + doped.frozen_forward_flops(cfg)
    )  # 0 unless doped

  @staticmethod
  def summary_extras(cfg, abstract_variables) -> dict:
    """What sharing and factorization do to the count: the embedding split into its parts (table V×E or V×H,
    projection E×H, learned position table, untied head), the unique blocks vs their applications, and the
    parameters the same network would have with L independent blocks."""
    params = abstract_variables.get('params', {})
    count = lambda tree: int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))
    embed, head, stack = params.get('embed', {}), params.get('head', {}), params.get('stack', {})
    unique = {'none': cfg.num_layers, 'all': 1, 'groups': cfg.num_groups}.get(cfg.share_layers, cfg.num_layers)
    per_block = (count(stack) + count(abstract_variables.get('frozen', {}).get('stack', {}))) // unique
    total = count(params) + count(abstract_variables.get('frozen', {}))
    extras = {
      'share_layers': cfg.share_layers,
      'layer_applications': cfg.num_layers,
      'unique_blocks': unique,
      'params_per_block': per_block,
      'embed_table_params': count(embed.get('embedding', ())),
      'embed_projection_params': count(embed.get('projection', ())),
      'pos_embedding_params': count(embed.get('pos_embedding', ())),
      'untied_head_params': count(head),
      'unshared_equivalent_params': total + (cfg.num_layers - unique) * per_block,
    }
    if doped.doping(cfg):
      extras.update(doped.summary_extras(cfg, abstract_variables))
    return extras


def memory_blocks(cfg) -> list[tuple[str, int, int, int]]:
  """num_layers blocks of width d_model (shared or not, each is applied), and the doped frozen MLPs."""
  frozen = [('frozen', cfg.d_model, 0, doped.num_frozen_layers(cfg))] if doped.doping(cfg) else []
  return models.plain_memory_blocks(cfg) + frozen


models.register_family(
  models.Family(
    'gpt',
    GPT,
    forward_flops=GPT.forward_flops_per_token,
    param_keys=GPT.param_keys,
    summary_extras=GPT.summary_extras,
    memory_blocks=memory_blocks,
    doping=True,
  )
)
