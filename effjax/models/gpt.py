"""GPT and GPT-Efficio: a decoder-only transformer whose layer stack may share parameters across layers
(config.model.share_layers) and whose embedding may be factorized (config.model.embed_dim)."""
from __future__ import annotations

import flax.linen as nn
import jax

from effjax.models import layers


class GPT(nn.Module):
  cfg: layers.Config

  @nn.compact
  def __call__(self, tokens_BxT: jax.Array, train: bool = False, decode: bool = False) -> jax.Array:
    cfg = self.cfg
    positions_T = layers.decode_positions(self, tokens_BxT.shape[1], decode)
    embedder = layers.Embedder(cfg, cfg.d_model, name='embed')
    x_BxTxD = embedder(tokens_BxT, positions_T)
    x_BxTxD = nn.Dropout(cfg.dropout)(x_BxTxD, deterministic=not train)
    x_BxTxD = layers.LayerStack(
        block_cls=layers.Block,
        block_kwargs=dict(cfg=cfg, d_model=cfg.d_model, num_heads=cfg.num_heads, num_layers=cfg.num_layers,
                          train=train, decode=decode),
        num_layers=cfg.num_layers, scan=cfg.scan_layers, share=cfg.share_layers, num_groups=cfg.num_groups,
        remat=cfg.remat, name='stack')(x_BxTxD, positions_T)
    if cfg.final_norm:
      x_BxTxD = layers.make_norm(cfg, 'ln_f')(x_BxTxD)
    return layers.OutputHead(cfg, name='head')(x_BxTxD, embedder)

  @staticmethod
  def forward_flops_per_token(cfg, seq_len: int) -> int:
    """A shared block costs as much per application as an independent one: FLOPs grow with L either way."""
    return (layers.embed_forward_flops(cfg, cfg.d_model)
            + cfg.num_layers * layers.block_forward_flops(cfg, cfg.d_model, seq_len))
