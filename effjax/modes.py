"""What each `--mode` does. main.py parses flags; this module turns them into calls."""
from __future__ import annotations

import json
import os

import jax
import ml_collections

from effjax import accounting, checkpoint, sample, state as state_lib, train
from effjax.data import pipeline, tokenizers
from effjax.errors import EffjaxError


def dispatch(mode: str, config, flags) -> None:
  {'train': run_train, 'eval': run_eval, 'sample': run_sample, 'summary': run_summary,
   'export': run_export}[mode](config, flags)


def run_train(config, flags) -> None:
  result = train.train_and_evaluate(config, flags.workdir)
  if jax.process_index() == 0 and result:
    print(json.dumps({k: round(v, 4) for k, v in result.items()}))


def run_summary(config, flags) -> None:
  config = ml_collections.ConfigDict(config.to_dict())
  if config.model.vocab_size == 0:
    config.model.vocab_size = _vocab_without_corpus(config, flags.workdir)
  summary = accounting.summarize(config)
  print(accounting.format_table(summary))
  if flags.workdir:
    train.prepare_workdir(flags.workdir)
    checkpoint.write_json_atomic(os.path.join(flags.workdir, 'summary.json'), summary)


def _vocab_without_corpus(config, workdir) -> int:
  """summary must not need data: the cached tokenizer if the run has one, else what the tokenizer implies."""
  cached = os.path.join(workdir or '', 'data', 'tokenizer.json')
  if workdir and os.path.exists(cached):
    return tokenizers.load_tokenizer(os.path.dirname(cached)).vocab_size
  if config.data.tokenizer == 'byte':
    return 256
  if config.data.tokenizer == 'bpe':
    return config.data.bpe_vocab_size
  raise EffjaxError('model.vocab_size=0 with the char tokenizer: the vocabulary comes from the corpus; set '
                    '--config.model.vocab_size or train first in this --workdir')


def restore_trained(config, workdir: str):
  """(setup, state, config, tokenizer) of the newest checkpoint in `workdir`."""
  tokenizer_dir = os.path.join(workdir, 'data')
  if not os.path.exists(os.path.join(tokenizer_dir, 'tokenizer.json')):
    raise EffjaxError(f'no trained run in {workdir!r} (no data/tokenizer.json); train first with --mode=train')
  tokenizer = tokenizers.load_tokenizer(tokenizer_dir)
  config = train.resolve_vocab(config, tokenizer)
  setup = state_lib.make_setup(config)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), config.checkpoint.keep)
  try:
    if ckpt.latest_step() is None:
      raise EffjaxError(f'no checkpoint in {workdir}/checkpoints; train first with --mode=train')
    state, meta = train.restore_or_init(setup, config, ckpt, None, workdir)
    if meta is None:
      raise EffjaxError(f'no readable checkpoint in {workdir}/checkpoints')
  finally:
    ckpt.close()
  return setup, state, config, tokenizer, meta


def _model_and_variables(config, flags):
  if flags.from_export:
    model, variables, config = checkpoint.load_export(flags.from_export)
    tokenizer = tokenizers.load_tokenizer(flags.from_export)
    return model, variables, config, tokenizer
  setup, state, config, tokenizer, _ = restore_trained(config, flags.workdir)
  return setup.model, state.variables(), config, tokenizer


def run_sample(config, flags) -> None:
  model, variables, config, tokenizer = _model_and_variables(config, flags)
  texts = sample.sample_text(model, variables, tokenizer, flags.prompt or '\n', max_new_tokens=flags.max_new_tokens,
                             temperature=flags.temperature, top_k=flags.top_k, top_p=flags.top_p,
                             seed=flags.seed, num_samples=flags.num_samples)
  for i, text in enumerate(texts):
    if len(texts) > 1:
      print(f'--- sample {i}')
    print(flags.prompt + text)


def run_eval(config, flags) -> None:
  if flags.from_export:
    raise EffjaxError('--mode=eval reads the validation data of a workdir; pass --workdir (not --from_export)')
  setup, state, config, _, meta = restore_trained(config, flags.workdir)
  bundle = pipeline.prepare_data(config.data, os.path.join(flags.workdir, 'data'))
  batches = pipeline.eval_batches(bundle.val_tokens, seq_len=config.data.seq_len,
                                  batch_size=config.train.batch_size, max_batches=config.train.eval_batches)
  from effjax import sharding  # pylint: disable=import-outside-toplevel
  divisor = sharding.batch_divisor(setup.mesh, setup.rules)
  loss = train.evaluate_loss(setup, state, [train.eval_rows(b, divisor) for b in batches])
  result = {'step': meta['step'], **train.eval_metrics(loss, bundle.val_bytes_per_token)}
  if flags.tasks:
    from effjax import evaluate  # pylint: disable=import-outside-toplevel
    result['tasks'] = evaluate.run_tasks(setup.model, state.variables(), bundle.tokenizer, flags.tasks,
                                         num_shots=flags.num_shots)
  if jax.process_index() == 0:
    checkpoint.write_json_atomic(os.path.join(flags.workdir, 'eval.json'), result)
  print(json.dumps(result))


def run_export(config, flags) -> None:
  if not flags.export_dir:
    raise EffjaxError('--mode=export needs --export_dir=DIR')
  setup, state, config, _, meta = restore_trained(config, flags.workdir)
  counts = accounting.param_counts(config.model)
  import effjax  # pylint: disable=import-outside-toplevel
  metadata = {'family': config.model.family, 'effjax_version': effjax.__version__, 'step': meta['step'],
              'tokens_seen': meta['tokens_seen'], **counts}
  checkpoint.export(flags.export_dir, jax.device_get(state.variables()), config,
                    os.path.join(flags.workdir, 'data', 'tokenizer.json'), metadata, flags.export_dtype)
  print(f'exported step {meta["step"]} to {flags.export_dir}')
