"""Bad input across the CLI: every mode and every family. Each mistake ends with exactly one line
`effjax: error: ...` on stderr (no traceback), exit code 2, and nothing written or overwritten (the files of the
workdir / export are hashed before and after).

Most cases run the CLI in-process (`cli()` below: absl parsing + effjax.main.main, SystemExit caught, stdout and
stderr captured), which takes milliseconds for parse-level mistakes; a handful go through a real subprocess.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import sys
from unittest import mock

import pytest

from effjax import main as effjax_main
from effjax import train
from tests.helpers import run_cli, tiny_config

FAMILIES = ('gpt', 'pgpt', 'lcgpt', 'ccgpt')
MODES = effjax_main.MODES


def family_config(family: str) -> str:
  """configs/<family>.py:tiny when that variant file exists, else the GPT tiny preset (family set by override)."""
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs', f'{family}.py')
  return f'--config=configs/{family}.py:tiny' if os.path.exists(path) else '--config=configs/gpt.py:tiny'


def family_args(family: str) -> list[str]:
  args = [family_config(family)]
  if 'gpt.py' in args[0] and family != 'gpt':
    args.append(f'--config.model.family={family}')
  return args


def _reset_flags():
  """Forgets the previous parse, including the --config.* override flags config_flags defined for it."""
  flag_values = effjax_main.FLAGS
  flag_values.unparse_flags()
  for name in [n for n in flag_values if n.startswith('config.')]:
    delattr(flag_values, name)


def cli(*args: str):
  """Runs the effjax CLI in this process: (exit code, stdout, stderr)."""
  argv = ['effjax', *args]
  _reset_flags()
  out, err = io.StringIO(), io.StringIO()
  code = 0
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with (
    mock.patch.object(sys, 'argv', argv),
    contextlib.redirect_stdout(out),
    contextlib.redirect_stderr(err),
    _chdir(root),
  ):
    try:
      effjax_main.main(effjax_main.parse_flags(argv))
    except SystemExit as e:
      code = e.code if isinstance(e.code, int) else 1
  _reset_flags()
  return code, out.getvalue(), err.getvalue()


@contextlib.contextmanager
def _chdir(path):
  old = os.getcwd()
  os.chdir(path)
  try:
    yield
  finally:
    os.chdir(old)


def snapshot(*directories) -> dict:
  """Content hashes of every file under the directories (the workdir lock file aside)."""
  out = {}
  for directory in directories:
    for root, _, files in os.walk(directory):
      for name in files:
        if name == '.lock':
          continue
        path = os.path.join(root, name)
        with open(path, 'rb') as f:
          out[path] = hashlib.sha256(f.read()).hexdigest()
  return out


def assert_one_error_line(code, err, pattern=None):
  assert code == 2, (code, err)
  assert 'Traceback' not in err, err
  errors = [line for line in err.splitlines() if line.startswith('effjax: error:')]
  assert len(errors) == 1, err
  assert err.rstrip().splitlines()[-1] == errors[0], err
  if pattern:
    import re  # pylint: disable=import-outside-toplevel

    assert re.search(pattern, errors[0]), errors[0]
  return errors[0]


@pytest.fixture(scope='module')
def trained(tmp_path_factory, corpus_dir):
  """A tiny GPT run (2 steps, checkpoint at 2) and its export."""
  root = tmp_path_factory.mktemp('bad_input')
  workdir = str(root / 'run')
  train.train_and_evaluate(
    tiny_config(corpus_dir, **{'train.steps': 2, 'checkpoint.every': 2}), workdir, progress=False
  )
  code, _, err = cli(
    '--config=configs/gpt.py:tiny',
    f'--workdir={workdir}',
    f'--config.data.corpus={corpus_dir}',
    '--mode=export',
    f'--export_dir={root}/export',
  )
  assert code == 0, err
  return {'workdir': workdir, 'export': str(root / 'export'), 'root': root, 'corpus': corpus_dir}


def mode_args(mode, trained, tmp_path):
  """What each mode needs besides the config (a workdir, an export dir ...)."""
  common = [f'--config.data.corpus={trained["corpus"]}']
  if mode in ('summary', 'memory'):
    return common + ['--config.model.vocab_size=64']
  if mode == 'train':
    return common + [f'--workdir={tmp_path}/fresh', '--progress=false']
  if mode == 'export':
    return common + [f'--workdir={trained["workdir"]}', f'--export_dir={tmp_path}/new_export']
  return common + [f'--workdir={trained["workdir"]}']


# --------------------------------------------------------------------------------------------------------
# Every mode x every family: config mistakes are one line and change nothing.

CONFIG_MISTAKES = {
  'unknown_key': (['--config.model.no_such_key=1'], r'no_such_key'),
  'unknown_section': (['--config.no_such_section.x=1'], r'no_such_section'),
  'ill_typed': (['--config.model.d_model=abc'], r'd_model'),
  'float_for_int': (['--config.train.steps=1.5'], r'steps'),
  'incompatible_dims': (['--config.model.num_heads=3'], r'num_heads=3 does not divide'),
  'negative_layers': (['--config.model.num_layers=-1'], r'num_layers'),
}


@pytest.mark.parametrize('family', FAMILIES)
@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('mistake', sorted(CONFIG_MISTAKES))
def test_config_mistake_every_mode_every_family(trained, tmp_path, family, mode, mistake):
  extra, pattern = CONFIG_MISTAKES[mistake]
  before = snapshot(trained['workdir'], trained['export'])
  code, out, err = cli(*family_args(family), *mode_args(mode, trained, tmp_path), f'--mode={mode}', *extra)
  assert_one_error_line(code, err, pattern)
  assert snapshot(trained['workdir'], trained['export']) == before
  assert not os.path.exists(tmp_path / 'fresh' / 'data') and not os.path.exists(tmp_path / 'new_export')
  assert 'step' not in out


@pytest.mark.parametrize('family', [f for f in FAMILIES if f != 'gpt'])
@pytest.mark.parametrize('mode', ['train', 'eval', 'sample', 'export'])
def test_checkpoint_of_another_family(trained, tmp_path, family, mode):
  before = snapshot(trained['workdir'])
  args = [
    *family_args(family),
    f'--workdir={trained["workdir"]}',
    f'--config.data.corpus={trained["corpus"]}',
    f'--mode={mode}',
    '--progress=false',
    f'--export_dir={tmp_path}/new_export',
  ]
  code, _, err = cli(*args)
  assert_one_error_line(code, err, r'family')
  assert snapshot(trained['workdir']) == before
  assert not os.path.exists(tmp_path / 'new_export')


@pytest.mark.parametrize(
  'mode,override,pattern',
  [
    *[
      (mode, override, pattern)
      for mode in ('train', 'eval', 'sample', 'export')
      for override, pattern in (
        ('--config.model.d_model=128', r'd_model: checkpoint 64 vs config 128'),
        ('--config.model.num_layers=3', r'num_layers: checkpoint 2 vs config 3'),
      )
    ],
    # the data settings matter where the data is read (sample and export use the run's own tokenizer)
    *[(mode, '--config.data.tokenizer=byte', r'tokenizer') for mode in ('train', 'eval')],
  ],
)
def test_checkpoint_of_another_size(trained, tmp_path, mode, override, pattern):
  before = snapshot(trained['workdir'])
  code, _, err = cli(
    '--config=configs/gpt.py:tiny',
    f'--workdir={trained["workdir"]}',
    f'--config.data.corpus={trained["corpus"]}',
    f'--mode={mode}',
    override,
    '--progress=false',
    f'--export_dir={tmp_path}/new_export',
  )
  assert_one_error_line(code, err, pattern)
  assert snapshot(trained['workdir']) == before
  assert not os.path.exists(tmp_path / 'new_export')


# --------------------------------------------------------------------------------------------------------
# Mode-specific mistakes. Each case: (args, expected pattern); {W} the trained workdir, {E} its export,
# {T} a fresh temporary directory, {C} the test corpus, {F} a regular file.

CASES = {
  # command line
  'unknown_mode': (['--config=configs/gpt.py:tiny', '--workdir={T}/w', '--mode=bogus'], r"--mode='bogus'"),
  'missing_config': (['--workdir={T}/w'], r'--config is required'),
  'missing_config_file': (
    ['--config=configs/no_such_file.py', '--workdir={T}/w'],
    r"there is no file 'configs/no_such_file.py'",
  ),
  'unknown_preset': (['--config=configs/gpt.py:no_such_preset', '--workdir={T}/w'], r'unknown preset'),
  'unknown_flag': (['--config=configs/gpt.py:tiny', '--workdir={T}/w', '--no_such_flag=1'], r'no_such_flag'),
  'bad_flag_type': (
    ['--config=configs/gpt.py:tiny', '--workdir={W}', '--mode=sample', '--max_new_tokens=x'],
    r'max_new_tokens',
  ),
  'from_export_in_train': (
    ['--config=configs/gpt.py:tiny', '--from_export={E}', '--mode=train'],
    r'--from_export is for',
  ),
  # train
  'train_non_utf8_corpus': (
    ['--config=configs/gpt.py:tiny', '--workdir={T}/w', '--config.data.corpus={T}/bad'],
    r'not UTF-8',
  ),
  'train_nul_corpus': (
    ['--config=configs/gpt.py:tiny', '--workdir={T}/w', '--config.data.corpus={T}/nul'],
    r'holds no text to learn from: its \d+ training tokens use 0 distinct char token',
  ),
  'train_nul_corpus_bytes': (
    ['--config=configs/gpt.py:tiny', '--workdir={T}/w', '--config.data.corpus={T}/nul', '--config.data.tokenizer=byte'],
    r'use 0 distinct byte token',
  ),
  'train_out_of_vocab_ids': (
    ['--config=configs/gpt.py:tiny', '--workdir={T}/w', '--config.data.dataset={T}/ids'],
    r'holds token id 65535 but its tokenizer has \d+ ids: its shards are damaged',
  ),
  'train_missing_corpus': (
    ['--config=configs/gpt.py:tiny', '--workdir={T}/w', '--config.data.corpus={T}/none'],
    r'is not a file, directory or matching glob',
  ),
  'train_unwritable_workdir': (
    ['--config=configs/gpt.py:tiny', '--workdir={F}/w', '--config.data.corpus={C}'],
    r'not writable',
  ),
  'train_zero_steps': (['--config=configs/gpt.py:tiny', '--workdir={T}/w', '--config.train.steps=0'], r'train.steps=0'),
  'train_negative_lr': (['--config=configs/gpt.py:tiny', '--workdir={T}/w', '--config.train.lr=-1.0'], r'train.lr'),
  'train_bad_mesh': (['--config=configs/gpt.py:tiny', '--workdir={T}/w', '--config.mesh.data=3'], r'mesh'),
  'train_negative_cpu_devices': (
    ['--config=configs/gpt.py:tiny', '--workdir={T}/w', '--config.mesh.cpu_devices=-2'],
    r'mesh.cpu_devices=-2 is invalid; use 0',
  ),
  'train_seq_longer_than_context': (
    ['--config=configs/gpt.py:tiny', '--workdir={T}/w', '--config.data.seq_len=64'],
    r'data.seq_len=64',
  ),
  'train_other_corpus_on_run': (
    ['--config=configs/gpt.py:tiny', '--workdir={W}', '--config.data.corpus={T}/bad'],
    r'data.corpus',
  ),
  # sample
  'sample_empty_prompt': (
    ['--config=configs/gpt.py:tiny', '--workdir={W}', '--config.data.corpus={C}', '--mode=sample', '--prompt='],
    r'--prompt is empty',
  ),
  'sample_zero_new_tokens': (
    [
      '--config=configs/gpt.py:tiny',
      '--workdir={W}',
      '--config.data.corpus={C}',
      '--mode=sample',
      '--prompt=def ',
      '--max_new_tokens=0',
    ],
    r'max_new_tokens=0',
  ),
  'sample_bad_top_p': (
    [
      '--config=configs/gpt.py:tiny',
      '--workdir={W}',
      '--config.data.corpus={C}',
      '--mode=sample',
      '--prompt=def ',
      '--max_new_tokens=4',
      '--top_p=2',
    ],
    r'top_p',
  ),
  'sample_untrained_workdir': (['--config=configs/gpt.py:tiny', '--workdir={T}', '--mode=sample'], r'no trained run'),
  'sample_missing_workdir': (
    ['--config=configs/gpt.py:tiny', '--workdir={T}/none', '--mode=sample'],
    r'does not exist',
  ),
  'sample_missing_export': (['--from_export={T}/none', '--mode=sample'], r'does not exist'),
  'sample_export_is_a_file': (['--from_export={F}', '--mode=sample'], r'not a directory'),
  'sample_not_an_export': (['--from_export={T}', '--mode=sample'], r'not an effjax export'),
  'sample_corrupt_export_variables': (['--from_export={T}/bad_vars', '--mode=sample'], r'unreadable'),
  'sample_corrupt_export_config': (['--from_export={T}/bad_config', '--mode=sample'], r'config.json'),
  'sample_corrupt_export_tokenizer': (['--from_export={T}/bad_tok', '--mode=sample', '--prompt=x'], r'tokenizer'),
  'sample_export_empty_prompt': (['--from_export={E}', '--mode=sample', '--prompt='], r'--prompt is empty'),
  # eval
  'eval_missing_task_file': (
    [
      '--config=configs/gpt.py:tiny',
      '--workdir={W}',
      '--config.data.corpus={C}',
      '--mode=eval',
      '--tasks=cloze:{T}/none.jsonl',
    ],
    r'does not exist',
  ),
  'eval_bad_task_json': (
    [
      '--config=configs/gpt.py:tiny',
      '--workdir={W}',
      '--config.data.corpus={C}',
      '--mode=eval',
      '--tasks=cloze:{T}/bad.jsonl',
    ],
    r'line 2 is not valid JSON',
  ),
  'eval_task_missing_field': (
    [
      '--config=configs/gpt.py:tiny',
      '--workdir={W}',
      '--config.data.corpus={C}',
      '--mode=eval',
      '--tasks=choice:{T}/nolabel.jsonl',
    ],
    r'no label field',
  ),
  'eval_negative_shots': (
    [
      '--config=configs/gpt.py:tiny',
      '--workdir={W}',
      '--config.data.corpus={C}',
      '--mode=eval',
      '--tasks=cloze:{T}/ok.jsonl',
      '--num_shots=-1',
    ],
    r'num_shots',
  ),
  'eval_too_many_shots': (
    ['--from_export={E}', '--mode=eval', '--tasks=cloze:{T}/ok.jsonl', '--num_shots=5'],
    r'num_shots=5 needs at least 6',
  ),
  'eval_bad_pass_k': (['--from_export={E}', '--mode=eval', '--tasks=humaneval', '--pass_k=1,x'], r'pass_k'),
  'eval_pass_k_above_samples': (
    ['--from_export={E}', '--mode=eval', '--tasks=humaneval', '--pass_k=10'],
    r'num_samples >= 10',
  ),
  'eval_export_without_tasks': (['--from_export={E}', '--mode=eval'], r'--tasks'),
  'eval_untrained_workdir': (['--config=configs/gpt.py:tiny', '--workdir={T}', '--mode=eval'], r'no trained run'),
  'eval_unknown_task_kind': (
    ['--from_export={E}', '--mode=eval', '--tasks={T}/weird.jsonl'],
    r'cannot tell the task kind',
  ),
  # export
  'export_into_workdir': (
    ['--config=configs/gpt.py:tiny', '--workdir={W}', '--config.data.corpus={C}', '--mode=export', '--export_dir={W}'],
    r'already exists and is not empty',
  ),
  'export_over_export': (
    ['--config=configs/gpt.py:tiny', '--workdir={W}', '--config.data.corpus={C}', '--mode=export', '--export_dir={E}'],
    r'already exists and is not empty',
  ),
  'export_unwritable': (
    [
      '--config=configs/gpt.py:tiny',
      '--workdir={W}',
      '--config.data.corpus={C}',
      '--mode=export',
      '--export_dir={F}/e',
    ],
    r'not writable',
  ),
  'export_missing_dir_flag': (['--config=configs/gpt.py:tiny', '--workdir={W}', '--mode=export'], r'--export_dir'),
  'export_untrained': (
    ['--config=configs/gpt.py:tiny', '--workdir={T}', '--mode=export', '--export_dir={T}/e'],
    r'no trained run',
  ),
  'export_bad_dtype': (
    ['--config=configs/gpt.py:tiny', '--workdir={W}', '--mode=export', '--export_dir={T}/e', '--export_dtype=float16'],
    r'export_dtype',
  ),
  # summary
  'summary_unwritable_workdir': (
    ['--config=configs/gpt.py:tiny', '--workdir={F}/w', '--mode=summary', '--config.model.vocab_size=64'],
    r'not writable',
  ),
}


@pytest.fixture
def fixtures(trained, tmp_path):
  """The files the cases point at: a non-UTF-8 corpus, broken exports, task files, a regular file."""
  (tmp_path / 'bad').mkdir()
  (tmp_path / 'bad' / 'a.txt').write_bytes(b'def f():\n    return 1\n' * 50 + b'\xff\xfe broken \x80\n')
  (tmp_path / 'file').write_text('a regular file, not a directory')
  (tmp_path / 'nul').mkdir()
  (tmp_path / 'nul' / 'zeros.txt').write_bytes(b'\0' * 20000)
  shutil.copytree(os.path.join(trained['workdir'], 'data'), tmp_path / 'ids')  # the run's prepared dataset ...
  for shard in (tmp_path / 'ids').glob('train-*.bin'):  # ... with every training id out of the vocabulary
    shard.write_bytes(b'\xff' * shard.stat().st_size)
  for name in ('bad_vars', 'bad_config', 'bad_tok'):
    shutil.copytree(trained['export'], tmp_path / name)
  for root, _, files in os.walk(tmp_path / 'bad_vars' / 'variables'):
    for f in files:
      path = os.path.join(root, f)
      if os.path.getsize(path) > 200 and '/d/' in path:
        with open(path, 'r+b') as fh:
          fh.truncate(os.path.getsize(path) // 3)
  (tmp_path / 'bad_config' / 'config.json').write_text('{"model": {"family": "gpt", ')
  (tmp_path / 'bad_tok' / 'tokenizer.json').write_text('not json at all')
  (tmp_path / 'ok.jsonl').write_text('\n'.join(json.dumps({'text': t}) for t in ('def f', 'return x', 'x = 1')))
  (tmp_path / 'bad.jsonl').write_text('{"text": "def f"}\n{"text": \n')
  (tmp_path / 'nolabel.jsonl').write_text(json.dumps({'ctx': 'def', 'endings': [' f', ' g']}) + '\n')
  (tmp_path / 'weird.jsonl').write_text(json.dumps({'foo': 1}) + '\n')
  return {
    'W': trained['workdir'],
    'E': trained['export'],
    'T': str(tmp_path),
    'C': trained['corpus'],
    'F': str(tmp_path / 'file'),
  }


@pytest.mark.parametrize('case', sorted(CASES))
def test_bad_input_case(fixtures, case):
  args, pattern = CASES[case]
  args = [a.format(**fixtures) for a in args]
  if not any(a.startswith('--progress') for a in args):
    args.append('--progress=false')
  watched = [fixtures['W'], fixtures['E'], fixtures['T']]
  before = snapshot(*watched)
  code, out, err = cli(*args)
  assert_one_error_line(code, err, pattern)
  assert snapshot(*watched) == before, f'{case} changed files'
  for fresh in ('w', 'e'):  # a failed run creates no new directory with files in it
    assert not snapshot(os.path.join(fixtures['T'], fresh)), case
  assert not out.strip(), out


# --------------------------------------------------------------------------------------------------------
# A handful through a real subprocess: the one-line contract holds for the real entry point too.


@pytest.mark.parametrize(
  'args,pattern',
  [
    (['--config=configs/gpt.py:tiny', '--workdir={T}/w', '--config.model.no_such_key=1'], r'no_such_key'),
    (
      ['--config=configs/gpt.py:tiny', '--workdir={T}/w', '--config.data.corpus={T}/bad', '--progress=false'],
      r'not UTF-8',
    ),
    (['--from_export={T}/bad_vars', '--mode=sample', '--prompt=def'], r'unreadable'),
  ],
)
def test_bad_input_subprocess(fixtures, args, pattern):
  args = [a.format(**fixtures) for a in args]
  before = snapshot(fixtures['T'])
  result = run_cli(*args)
  assert_one_error_line(result.returncode, result.stderr, pattern)
  assert snapshot(fixtures['T']) == before
  assert not snapshot(os.path.join(fixtures['T'], 'w'))


def test_prompt_outside_the_vocabulary_is_one_warning(trained, caplog):
  """Surprising but valid: characters the run never saw are read as "unknown"; the sample says so once."""
  before = snapshot(trained['workdir'])
  with caplog.at_level('WARNING'):
    code, out, err = cli(
      f'--workdir={trained["workdir"]}', '--mode=sample', '--prompt=def €λ(', '--max_new_tokens=4', '--progress=false'
    )
  assert code == 0, err
  assert 'Traceback' not in err
  warnings = [r.getMessage() for r in caplog.records if 'not in the vocabulary of this run' in r.getMessage()]
  assert len(warnings) == 1 and "'λ€'" in warnings[0], warnings
  assert out.startswith('def €λ(')
  assert snapshot(trained['workdir']) == before
