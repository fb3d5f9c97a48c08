"""What each `--mode` does. main.py parses flags; this module turns them into calls."""

from __future__ import annotations

import json

import jax
import ml_collections
from absl import logging

from effjax import accounting, checkpoint, paths, sample, state as state_lib, train
from effjax.data import pipeline, tokenizers
from effjax.errors import EffjaxError


def dispatch(mode: str, config, flags) -> None:
  {
    'train': run_train,
    'eval': run_eval,
    'sample': run_sample,
    'summary': run_summary,
    'export': run_export,
    'memory': run_memory,
  }[mode](config, flags)


def run_train(config, flags) -> None:
  result = train.train_and_evaluate(config, flags.workdir, progress=flags.progress)
  if jax.process_index() == 0 and result:
    print(json.dumps({k: round(v, 4) for k, v in result.items()}))


def run_summary(config, flags) -> None:
  config = ml_collections.ConfigDict(config.to_dict())
  if config.model.vocab_size == 0:
    config.model.vocab_size = _vocab_without_corpus(config, flags.workdir)
  summary = accounting.summarize(config)
  if flags.workdir:  # an unwritable workdir fails before anything is printed
    train.prepare_workdir(flags.workdir)
  print(accounting.format_table(summary))
  if flags.workdir:
    checkpoint.write_json_atomic(paths.join(flags.workdir, 'summary.json'), summary)


def run_memory(config, flags) -> None:
  """Per-device bytes of params, grads, optimizer state and activations on --accelerator / --devices, from the
  abstract model (effjax/memory.py documents the formula); writes DIR/memory.json when --workdir is given."""
  from effjax import memory  # pylint: disable=import-outside-toplevel

  config = ml_collections.ConfigDict(config.to_dict())
  if config.model.vocab_size == 0:
    config.model.vocab_size = _vocab_without_corpus(config, flags.workdir)
  devices, hbm, kind = (
    memory.parse_accelerator(flags.accelerator) if flags.accelerator else (jax.device_count(), None, '')
  )
  if flags.devices is not None:
    if flags.devices < 1:
      raise EffjaxError(f'--devices={flags.devices} is invalid; it must be a positive integer')
    devices = flags.devices
  result = memory.plan(config, devices, hbm, kind)
  if flags.workdir:  # an unwritable workdir fails before anything is printed
    train.prepare_workdir(flags.workdir)
  print(memory.format_plan(result, flags.accelerator or ''))
  if flags.workdir:
    checkpoint.write_json_atomic(paths.join(flags.workdir, 'memory.json'), result)


def _vocab_without_corpus(config, workdir) -> int:
  """summary needs no trained run: the tokenizer of data.dataset or of the run's own dataset if there is one,
  else the size the tokenizer implies (byte: 256, bpe: data.bpe_vocab_size), else (char) the characters of the
  sample a prepare would learn it from, read but not tokenized (about a second for the embedded corpus)."""
  from effjax.data import dataset, prepare, sources  # pylint: disable=import-outside-toplevel

  prepared = pipeline.dataset_dir(config.data, workdir or '') if config.data.get('dataset') or workdir else None
  if prepared and dataset.read_manifest(prepared) is not None:
    return tokenizers.load_tokenizer(prepared).vocab_size
  if config.data.tokenizer == 'byte':
    return 256
  if config.data.tokenizer == 'bpe':
    return config.data.bpe_vocab_size
  settings = prepare.settings_from_config(config.data)
  files = sources.list_files(settings.corpus)
  tok, _ = prepare.learn_tokenizer(
    settings, prepare.assign_splits(sources.documents(files, settings.text_field), settings)
  )
  logging.info('model.vocab_size=0: %d, the char vocabulary of data.corpus=%r', tok.vocab_size, config.data.corpus)
  return tok.vocab_size


def restore_trained(config, workdir: str):
  """(setup, state, config, tokenizer) of the newest checkpoint in `workdir`."""
  paths.check(workdir, 'workdir')
  if not paths.isdir(workdir):
    raise EffjaxError(f'workdir {workdir!r} does not exist; train first with --mode=train')
  tokenizer_dir = pipeline.dataset_dir(config.data, workdir)
  if not paths.exists(paths.join(tokenizer_dir, 'tokenizer.json')):
    raise EffjaxError(f'no trained run in {workdir!r} (no data/tokenizer.json); train first with --mode=train')
  tokenizer = tokenizers.load_tokenizer(tokenizer_dir)
  config = train.resolve_vocab(config, tokenizer)
  train.check_backend(config.model)
  setup = state_lib.make_setup(config, with_optimizer=False)  # params only: no optimizer moments are read
  if not paths.isdir(paths.join(workdir, 'checkpoints')):
    raise EffjaxError(f'no checkpoint in {workdir}/checkpoints; train first with --mode=train')
  # Read-only: eval/sample/export never create, clean up or move anything in the workdir.
  ckpt = checkpoint.Checkpointer(paths.join(workdir, 'checkpoints'), config.checkpoint.keep, read_only=True)
  try:
    if ckpt.latest_step() is None:
      raise EffjaxError(f'no checkpoint in {workdir}/checkpoints; train first with --mode=train')
    state, meta = train.restore_or_init(setup, config, ckpt, None, workdir, quarantine=False)
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
  if flags.num_samples < 1:
    raise EffjaxError(f'--num_samples={flags.num_samples} is invalid; it must be a positive integer')
  model, variables, config, tokenizer = _model_and_variables(config, flags)
  if tokenizer.kind == 'char' and flags.prompt:
    unknown = sorted({c for c, i in zip(flags.prompt, tokenizer.encode(flags.prompt)) if i == 0})
    if unknown:
      logging.warning(
        'prompt characters %r are not in the vocabulary of this run: the model reads them as the unknown token',
        ''.join(unknown),
      )
  texts = sample.sample_text(
    model,
    variables,
    tokenizer,
    flags.prompt or '\n',
    max_new_tokens=flags.max_new_tokens,
    temperature=flags.temperature,
    top_k=flags.top_k,
    top_p=flags.top_p,
    seed=flags.seed,
    num_samples=flags.num_samples,
  )
  for i, text in enumerate(texts):
    if len(texts) > 1:
      print(f'--- sample {i}')
    print(flags.prompt + text)


def eval_options(flags) -> dict:
  """run_tasks keyword arguments from the eval flags (checked: one line per mistake)."""
  from effjax import evaluate  # pylint: disable=import-outside-toplevel

  try:
    pass_k = tuple(int(k) for k in getattr(flags, 'pass_k', ['1']))
  except ValueError:
    raise EffjaxError(f'--pass_k={",".join(flags.pass_k)} is invalid; give positive integers, e.g. 1,10') from None
  opts = dict(
    num_shots=flags.num_shots,
    max_examples=getattr(flags, 'max_examples', 0),
    num_samples=flags.num_samples,
    pass_k=pass_k,
    temperature=flags.temperature,
    top_k=flags.top_k,
    top_p=flags.top_p,
    max_new_tokens=flags.max_new_tokens,
    exec_timeout=getattr(flags, 'exec_timeout', 5.0),
    seed=flags.seed,
  )
  evaluate.check_options(
    opts['num_shots'], opts['max_examples'], opts['num_samples'], pass_k, opts['exec_timeout'], opts['max_new_tokens']
  )
  if opts['temperature'] < 0 or opts['top_k'] < 0 or not 0 < opts['top_p'] <= 1:
    raise EffjaxError(
      f'--temperature={opts["temperature"]}, --top_k={opts["top_k"]}, --top_p={opts["top_p"]} '
      'are invalid; need temperature >= 0, top_k >= 0, 0 < top_p <= 1'
    )
  return opts


def run_eval(config, flags) -> None:
  """Validation loss / perplexity / bits per byte of a workdir's newest checkpoint (-> DIR/eval.json) and the
  --tasks scores (effjax/evaluate.py). With --from_export only the tasks are scored (the validation split lives
  in a training workdir); eval.json is then written only if --workdir is given too."""
  from effjax import evaluate  # pylint: disable=import-outside-toplevel

  tasks, opts = None, None
  if flags.tasks:  # read and check every task file before any model work
    opts = eval_options(flags)
    tasks = evaluate.load_tasks(flags.tasks)
  if flags.from_export:
    if not tasks:
      raise EffjaxError(
        '--mode=eval --from_export scores --tasks only (validation loss needs the training '
        'workdir); pass --tasks=KIND:PATH or use --workdir without --from_export'
      )
    model, variables, _, tokenizer = _model_and_variables(config, flags)
    metadata = checkpoint.read_export_metadata(flags.from_export)
    result = {
      'export': paths.abspath(flags.from_export),
      'step': metadata.get('step'),
      'tasks': evaluate.run_tasks(model, variables, tokenizer, flags.tasks, tasks=tasks, **opts),
    }
    if flags.workdir and jax.process_index() == 0:
      train.prepare_workdir(flags.workdir)
      checkpoint.write_json_atomic(paths.join(flags.workdir, 'eval.json'), result)
    print(json.dumps(result))
    return
  setup, state, config, _, meta = restore_trained(config, flags.workdir)
  if jax.process_index() == 0:  # eval.json must be writable before the loss is computed, not after
    train.prepare_workdir(flags.workdir)
  bundle = pipeline.load(config.data, flags.workdir)
  batches = pipeline.eval_batches(
    bundle.val_tokens,
    seq_len=config.data.seq_len,
    batch_size=config.train.batch_size,
    max_batches=config.train.eval_batches,
  )
  from effjax import sharding  # pylint: disable=import-outside-toplevel

  divisor = sharding.batch_divisor(setup.mesh, setup.rules)
  vocab = bundle.tokenizer.vocab_size
  loss = train.evaluate_loss(
    setup, state, [train.eval_rows(pipeline.check_ids(b, vocab, bundle.directory), divisor) for b in batches]
  )
  result = {'step': meta['step'], **train.eval_metrics(loss, bundle.val_bytes_per_token)}
  if tasks:
    result['tasks'] = evaluate.run_tasks(
      setup.model, state.variables(), bundle.tokenizer, flags.tasks, tasks=tasks, **opts
    )
  if jax.process_index() == 0:
    checkpoint.write_json_atomic(paths.join(flags.workdir, 'eval.json'), result)
  print(json.dumps(result))


def run_export(config, flags) -> None:
  if not flags.export_dir:
    raise EffjaxError('--mode=export needs --export_dir=DIR')
  checkpoint.check_new_dir(flags.export_dir, 'export_dir')  # before the (slow) restore
  setup, state, config, tokenizer, meta = restore_trained(config, flags.workdir)
  del setup
  counts = accounting.param_counts(config.model)
  import effjax  # pylint: disable=import-outside-toplevel

  metadata = {
    'family': config.model.family,
    'effjax_version': effjax.__version__,
    'step': meta['step'],
    'tokens_seen': meta['tokens_seen'],
    'tokenizer': tokenizer.kind,
    'data_fingerprint': meta.get('fingerprint'),
    'source': paths.abspath(flags.workdir),
    **counts,
  }
  path = checkpoint.export(
    flags.export_dir,
    jax.device_get(state.variables()),
    config,
    paths.join(pipeline.dataset_dir(config.data, flags.workdir), 'tokenizer.json'),
    metadata,
    flags.export_dtype,
    layout=getattr(flags, 'export_layout', 'as_trained'),
  )
  print(f'exported step {meta["step"]} to {path}')
