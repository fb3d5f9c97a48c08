"""effjax command line: `effjax --config=VARIANT[:PRESET] --workdir=DIR [--mode=MODE] [--config.KEY=VALUE ...]`.

`effjax --help` shows the usage with examples (USAGE below); `effjax --list` the built-in variants and presets.
Every user mistake ends with one line on stderr and exit code 2; nothing already in the workdir is touched by a
failed run. Exit codes: 0 finished, 2 user error, 3 diverged, 75 preempted (checkpoint saved: resubmit); see
effjax/errors.py.
"""

from __future__ import annotations

import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from effjax import config_lookup
from effjax import errors
from effjax import runtime
from effjax.errors import EffjaxError

MODES = ('train', 'eval', 'sample', 'summary', 'export', 'memory', 'config')
# Modes that can take the run's own DIR/config.json when --config is not given.
WORKDIR_MODES = ('eval', 'sample', 'summary', 'export', 'memory', 'config')

USAGE = """effjax: train, evaluate, sample, export and account for parameter-efficient language models.

Usage:
  effjax --config=VARIANT[:PRESET] [--workdir=DIR] [--mode=MODE] [--config.KEY=VALUE ...]
  effjax --config=path/to/config.py[:PRESET] ...     a config file of your own (or configs/gpt.py in the repo)
  effjax --workdir=DIR --mode=MODE ...               eval/sample/export/summary/config: DIR's own config.json
  effjax --list                                      the built-in variants, their presets and what they are for
  python -m effjax.main ...                          the same as `effjax ...`

Modes: train (default; resumes from DIR/checkpoints), eval (validation loss -> DIR/eval.json; --tasks=...),
  sample (--prompt, --max_new_tokens, --temperature, --top_k, --top_p; --from_export=E), summary (parameter,
  byte and FLOP table -> DIR/summary.json), export (--export_dir=E), memory (per-device bytes of a planned run:
  --accelerator=v4-8 or --devices=N), config (every resolved key, its value and where it came from).

Examples:
  effjax --list
  effjax --config=gpt:tiny --workdir=runs/tiny                 # train for seconds on the embedded Python corpus
  effjax --workdir=runs/tiny --mode=sample --prompt='def '     # sample from that run (its own config.json)
  effjax --workdir=runs/tiny --mode=export --export_dir=exports/tiny
  effjax --from_export=exports/tiny --mode=sample --prompt='class '
  effjax --config=pgpt:paper --mode=summary                     # the paper's parameter counts, no training
  effjax --config=gpt:tiny --mode=config --config.train.steps=100

A config file of your own: a module with get_config(preset='') returning an ml_collections.ConfigDict, e.g.
  from effjax.configs import gpt
  def get_config(preset=''):
    c = gpt.get_config(preset)
    c.model.num_layers = 6
    return c
"""

config_flags.DEFINE_config_file(
  'config',
  None,
  'VARIANT[:PRESET] (a built-in variant: --list) or PATH[:PRESET] of '
  'a config file; default for eval/sample/export/summary: DIR/config.json',
  lock_config=True,
)
flags.DEFINE_bool('list', False, 'List the built-in variants with their presets and purposes, then exit.')
flags.DEFINE_string('workdir', None, 'Run directory (checkpoints, metrics, tokenizer, summary).')
flags.DEFINE_string('mode', 'train', f'One of {", ".join(MODES)}.')
flags.DEFINE_string('prompt', '', 'sample: text to continue.')
flags.DEFINE_integer('max_new_tokens', 200, 'sample: tokens to generate.')
flags.DEFINE_float('temperature', 0.8, 'sample: softmax temperature; 0 = greedy.')
flags.DEFINE_integer('top_k', 0, 'sample: keep the k most likely tokens (0 = all).')
flags.DEFINE_float('top_p', 1.0, 'sample: nucleus sampling mass (1 = off).')
flags.DEFINE_integer('seed', 0, 'sample: random seed.')
flags.DEFINE_integer('num_samples', 1, 'sample: number of continuations.')
flags.DEFINE_string('export_dir', None, 'export: where to write the inference export.')
flags.DEFINE_string('from_export', None, 'sample/eval: load the model from an export instead of a workdir.')
flags.DEFINE_enum('export_dtype', 'float32', ['float32', 'bfloat16'], 'export: parameter dtype.')
flags.DEFINE_enum(
  'export_layout',
  'as_trained',
  ['as_trained', 'scanned', 'unscanned'],
  'export: layer layout of the exported params (stacked on a leading axis, or layer_i).',
)
flags.DEFINE_list(
  'tasks',
  [],
  'eval: tasks to score besides validation loss: KIND:PATH.jsonl with KIND in text, '
  'cloze, choice, qa, humaneval (see effjax/evaluate.py), or humaneval (the packaged problems).',
)
flags.DEFINE_integer('num_shots', 0, 'eval: few-shot examples per task prompt.')
flags.DEFINE_integer('max_examples', 0, 'eval: score at most this many examples (problems) per task; 0 = all.')
flags.DEFINE_list('pass_k', ['1'], 'eval (humaneval): the k of pass@k; needs --num_samples >= k.')
flags.DEFINE_float('exec_timeout', 5.0, 'eval (humaneval): seconds each candidate program may run.')
flags.DEFINE_string('coordinator_address', None, 'multi-process: HOST:PORT of process 0.')
flags.DEFINE_integer('num_processes', None, 'multi-process: number of processes.')
flags.DEFINE_integer('process_id', None, "multi-process: this process's index.")
flags.DEFINE_bool('progress', True, 'train: show a progress bar.')
flags.DEFINE_string(
  'accelerator',
  None,
  'memory: plan for this accelerator (v4-8, v5litepod-16, v6e-8, h100, '
  '8xh100, ...): its device count and HBM per device.',
)
flags.DEFINE_integer(
  'devices',
  None,
  "memory: plan for this many devices (default: the accelerator's, else the devices this process sees).",
)
FLAGS = flags.FLAGS


def fail(message: str, code: int = errors.EXIT_USER_ERROR) -> None:
  print(f'effjax: error: {message}', file=sys.stderr)
  sys.exit(code)


def parse_flags(argv):
  """Flag parsing that turns config-override mistakes (unknown key, wrong type) into one line."""
  if any(arg in ('--help', '-help', '-h', '-?', '--helpshort') for arg in _own_args(argv)):
    print(usage())
    sys.exit(0)
  try:
    argv = with_config_resolved(argv)
    remaining = FLAGS(argv)
    if FLAGS['config'].value is not None:
      FLAGS.config.to_dict()  # a config file that failed to load reports it only on first use: report it now
    return remaining
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError, EffjaxError) as e:
    if isinstance(e, OSError):
      fail(f'--config could not be loaded ({_one_line(e).strip()})')
    detail = _unknown_override(argv) if isinstance(e, (AttributeError, KeyError)) else None
    fail(detail or _one_line(e))
  except SystemExit:
    raise
  return None


def _own_args(argv) -> list[str]:
  """The arguments before a `--` terminator (after it they are not effjax's)."""
  args = list(argv[1:])
  return args[: args.index('--')] if '--' in args else args


def _flag_value(argv, name: str) -> str | None:
  """The last value given to --name (as --name=V or --name V)."""
  value, args = None, _own_args(argv)
  for i, arg in enumerate(args):
    if re.match(rf'^--?{name}=', arg):
      value = arg.split('=', 1)[1]
    elif arg in (f'--{name}', f'-{name}') and i + 1 < len(args):
      value = args[i + 1]
  return value


def with_config_resolved(argv) -> list[str]:
  """argv with `--config=VARIANT[:PRESET]` turned into the installed file's path, or, for the modes that can do
  without one, `--config` taken from --workdir's config.json (config_lookup says how)."""
  argv, args = list(argv), _own_args(argv)
  for i, arg in enumerate(args, 1):
    if re.match(r'^--?config=', arg):
      argv[i] = '--config=' + config_lookup.resolve(arg.split('=', 1)[1])
      return argv
    if arg in ('--config', '-config') and i < len(args):
      argv[i + 1] = config_lookup.resolve(argv[i + 1])
      return argv
  workdir, mode = _flag_value(argv, 'workdir'), _flag_value(argv, 'mode') or 'train'
  if workdir and mode in WORKDIR_MODES and not _flag_value(argv, 'from_export'):
    argv.insert(1, '--config=' + config_lookup.workdir_spec(workdir))  # before any --config.KEY override
  return argv


def usage() -> str:
  return f'{USAGE}\nFlags:\n{FLAGS.module_help(sys.modules[__name__])}'


def _unknown_override(argv) -> str | None:
  """For an unknown --config.a.b override: which key does not exist, and the valid keys at that level."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  import ml_collections  # pylint: disable=import-outside-toplevel

  spec = next((a.split('=', 1)[1] for a in argv if a.startswith(('--config=', '-config='))), None)
  if not spec:
    return None
  path, _, preset = spec.partition(':')
  try:
    module_spec = importlib.util.spec_from_file_location('_effjax_config_probe', path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(preset) if preset else module.get_config()
  except Exception:  # pylint: disable=broad-except
    return None
  for arg in argv:
    match = re.match(r'^--?(?:no)?config\.([^=]+)', arg)
    if not match:
      continue
    node, parts = config, match.group(1).split('.')
    for i, part in enumerate(parts):
      if isinstance(node, ml_collections.ConfigDict) and part in node:
        node = node[part]
        continue
      where = '.'.join(['config', *parts[:i]])
      if isinstance(node, ml_collections.ConfigDict):
        return (
          f'--config.{match.group(1)} is unknown: {where} has no key {part!r}; valid keys: '
          f'{", ".join(sorted(node.keys()))}'
        )
      return f'--config.{match.group(1)} is unknown: {where} is a {type(node).__name__} value, not a section'
  return None


def _one_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  detail = text[-1] if text else type(e).__name__
  cause = e.__cause__ or e.__context__
  if isinstance(cause, (AttributeError, KeyError)) and 'override' not in detail:
    detail = f'{detail} ({str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__})'
  return detail


def init_distributed():
  """jax.distributed as effjax/distributed.py decides: explicit flags, SLURM, Open MPI, a multi-host TPU slice."""
  from effjax import distributed  # pylint: disable=import-outside-toplevel

  return distributed.initialize(
    {
      'coordinator_address': FLAGS.coordinator_address,
      'num_processes': FLAGS.num_processes,
      'process_id': FLAGS.process_id,
    }
  )


def default_workdir(config_arg: str) -> str:
  """runs/<variant>[_<preset>]: `--config=configs/pgpt.py:tiny` trains in runs/pgpt_tiny."""
  path, _, preset = config_arg.partition(':')
  name = os.path.splitext(os.path.basename(path))[0]
  return os.path.join('runs', f'{name}_{preset}' if preset else name)


def check_paths(config) -> None:
  """A gs:// path without the [gcs] extra (or another scheme) is one line before anything runs or is written."""
  from effjax import paths  # pylint: disable=import-outside-toplevel

  data = config.data if config is not None else {}
  for what, value in (
    ('--workdir', FLAGS.workdir),
    ('--export_dir', FLAGS.export_dir),
    ('--from_export', FLAGS.from_export),
    ('data.dataset', data.get('dataset')),
    *(('data.corpus', part.strip()) for part in str(data.get('corpus') or '').split(',')),
  ):
    if value:
      paths.check(value, what)


def run(argv) -> None:
  del argv
  if FLAGS.list:
    print(config_lookup.describe_variants())
    return
  if FLAGS.mode not in MODES:
    raise EffjaxError(f'--mode={FLAGS.mode!r} is unknown; valid modes: {", ".join(MODES)}')
  config = FLAGS.config
  if config is None and not (FLAGS.from_export and FLAGS.mode in ('sample', 'eval')):
    raise EffjaxError(
      '--config is required, e.g. --config=gpt:tiny (`effjax --list` shows the variants); '
      f"{'/'.join(WORKDIR_MODES)} also take a trained run's own config with --workdir=DIR alone"
    )
  if FLAGS.from_export is not None and FLAGS.mode not in ('sample', 'eval'):
    raise EffjaxError(f'--from_export is for --mode=sample and --mode=eval, not --mode={FLAGS.mode}')
  filename = config_flags.get_config_filename(FLAGS['config']) if config is not None else ''
  if config is not None:
    # The one resolve-and-validate step, for every mode: --mode=config, too, shows only a config the others accept.
    from effjax import models  # pylint: disable=import-outside-toplevel

    models.resolve(config)
  if FLAGS.mode == 'config':
    print(config_lookup.format_origins(config_lookup.origins(config, filename, FLAGS['config'].override_values)))
    return
  if config_lookup.is_workdir_spec(filename) and FLAGS.mode in ('eval', 'sample', 'export'):
    config_lookup.check_architecture(config, FLAGS.workdir)
  if FLAGS.workdir is None and FLAGS.mode not in ('summary', 'memory') and not FLAGS.from_export:
    FLAGS.workdir = default_workdir(filename)
    logging.info('no --workdir given: using %s', FLAGS.workdir)
  if FLAGS.mode == 'sample' and FLAGS['prompt'].present and not FLAGS.prompt:
    raise EffjaxError('--prompt is empty; give the text to continue (or leave out --prompt to start from a newline)')
  check_paths(config)
  from effjax import modes  # pylint: disable=import-outside-toplevel  (keeps --help and --list fast)

  if not init_distributed().initialize and FLAGS.mode == 'train':
    cpu_devices = runtime.split_cpu_into_devices(config)  # before jax starts; see effjax/runtime.py
    if cpu_devices and cpu_devices > 1:
      logging.info('XLA:CPU: %d devices, one per core (mesh.cpu_devices=1 keeps one device)', cpu_devices)
  modes.dispatch(FLAGS.mode, config, FLAGS)


class _QuietLibraries:
  """Keeps effjax's INFO lines but drops the orbax/grain INFO chatter (dozens of lines per checkpoint) and
  orbax's notes about read-only managers (eval/sample/export open the checkpoints read-only on purpose)."""

  NOISY = ('/orbax/', '/grain/')
  READ_ONLY_NOTES = ('CheckpointManagerOptions.read_only=True', 'Given directory is read only')

  def filter(self, record) -> bool:
    if any(part in record.pathname for part in self.NOISY):
      if record.levelno < logging.converter.STANDARD_WARNING:
        return False
      if record.exc_info and errors.is_no_space(record.exc_info[1]):
        return False  # a save thread's full disk: effjax reports it as one line (checkpoint.py)
      return not str(record.msg).startswith(self.READ_ONLY_NOTES)
    return True


def main(argv) -> None:
  logging.set_verbosity(logging.INFO)
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
    handler.addFilter(_QuietLibraries())
  try:
    run(argv)
  except errors.Preempted as e:  # exit code 75: the scheduler should resubmit (see errors.py)
    print(f'effjax: preempted: {e}', file=sys.stderr)
    sys.exit(e.exit_code)
  except EffjaxError as e:
    fail(str(e), e.exit_code)
  except OSError as e:
    if not errors.is_no_space(e):
      raise
    fail(str(errors.no_space_error(e.filename or FLAGS.workdir or '.', None, 'output')))


def entry() -> None:
  runtime.reexec_with_hugepages()  # before jax allocates anything; see effjax/runtime.py
  app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
  entry()
