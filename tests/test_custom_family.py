"""A family defined and registered in this file, with no library edit, goes through the standard entry points:
trained, checkpointed, resumed bit-identically, summarized, planned, exported, loaded back and sampled."""

import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax import checkpoint, memory, models, modes, sample, train
from effjax.data import tokenizers
from effjax.models import layers, structured
from tests.helpers import one_device, tiny_config, train_losses

FAMILY = 'mlpstack_test'


class MlpStack(layers.LanguageModel):
  """No attention: L pre-norm residual MLPs, each token on its own (causal by construction)."""

  def trunk(self, x_BxTxD, positions_T, train, decode):
    cfg = self.cfg
    for i in range(cfg.num_layers):
      h_BxTxD = layers.make_norm(cfg, f'ln_{i}')(x_BxTxD).astype(x_BxTxD.dtype)
      x_BxTxD = x_BxTxD + layers.Mlp(
        cfg, cfg.d_model, cfg.mlp_ratio * cfg.d_model, cfg.num_layers, train, name=f'mlp_{i}'
      )(h_BxTxD)
    return x_BxTxD


def forward_flops(cfg, seq_len):
  del seq_len  # no attention: nothing grows with the context
  d, f = cfg.d_model, cfg.mlp_ratio * cfg.d_model
  mlp = structured.dense_flops(cfg.mlp_kind, d, f) + structured.dense_flops(cfg.mlp_kind, f, d)
  return layers.embed_forward_flops(cfg, d) + cfg.num_layers * mlp


@pytest.fixture(scope='module', autouse=True)
def registered():
  models.register_family(
    models.Family(
      FAMILY, MlpStack, forward_flops=forward_flops, summary_extras=lambda cfg, v: {'mlp_blocks': cfg.num_layers}
    )
  )
  yield
  models._FAMILIES.pop(FAMILY)  # pylint: disable=protected-access


def _config(corpus_dir, **overrides):
  return tiny_config(
    corpus_dir, **{'model.family': FAMILY, 'train.steps': 8, 'train.log_every': 1, 'checkpoint.every': 4, **overrides}
  )


@pytest.mark.slow
def test_custom_family_trains_resumes_summarizes_and_exports(tmp_path, corpus_dir, capsys):
  straight, resumed = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
  train.train_and_evaluate(_config(corpus_dir), straight, devices=one_device(), progress=False)
  train.train_and_evaluate(_config(corpus_dir, **{'train.stop_at': 4}), resumed, devices=one_device(), progress=False)
  assert sorted(train_losses(resumed)) == [1, 2, 3, 4]
  train.train_and_evaluate(_config(corpus_dir), resumed, devices=one_device(), progress=False)
  assert train_losses(resumed) == train_losses(straight) and sorted(train_losses(straight)) == list(range(1, 9))

  config = _config(corpus_dir)
  config.model.vocab_size = tokenizers.load_tokenizer(os.path.join(resumed, 'data')).vocab_size
  v, d, f, t, big_l = config.model.vocab_size, 64, 256, 32, 2
  per_block = 2 * d + d * f + f + f * d + d  # ln_i, mlp fc, mlp proj
  want = v * d + t * d + big_l * per_block + 2 * d  # tied table, positions, blocks, ln_f
  flags = types.SimpleNamespace(
    workdir=resumed, export_dir=str(tmp_path / 'export'), export_dtype='float32', export_layout='as_trained'
  )
  modes.run_summary(config, flags)
  summary = json.loads(open(os.path.join(resumed, 'summary.json'), encoding='utf-8').read())
  assert summary['family'] == FAMILY and summary['total_params'] == want and summary['mlp_blocks'] == 2
  assert summary['flops_per_token'] == 2 * d * v + big_l * 4 * d * f
  assert memory.plan(config, 1)['total_param_bytes'] == 4 * want

  modes.run_export(config, flags)
  assert 'exported step 8' in capsys.readouterr().out
  model, variables, exported = checkpoint.load_export(flags.export_dir)
  assert isinstance(model, MlpStack) and exported.model.family == FAMILY
  assert sum(x.size for x in jax.tree.leaves(variables['params'])) == want
  tokens = jnp.asarray(np.arange(12)[None] % v, jnp.int32)
  logits = model.apply(variables, tokens)
  later = model.apply(variables, tokens.at[0, 6:].set(0))
  np.testing.assert_allclose(logits[0, :6], later[0, :6], rtol=1e-6)  # causal: a token sees no later one
  tokenizer = tokenizers.load_tokenizer(flags.export_dir)
  (text,) = sample.sample_text(
    model, variables, tokenizer, 'def ', max_new_tokens=5, temperature=0.0, top_k=0, top_p=1.0, seed=0
  )
  assert len(tokenizer.encode(text)) == 5
