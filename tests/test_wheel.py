"""Installed means usable: the built wheel, installed (not editable) into a fresh virtualenv, trains, samples,
exports, converts a GPT-2 directory and loads an export from a directory outside the repository.

The fresh venv gets effjax only from the wheel. Its third-party dependencies (jax, flax, ...) come from the test
venv's site-packages, named in a .pth file: a path listed there is put on sys.path but is not a site directory,
so the test venv's editable effjax hook is never run; the test checks `effjax.__file__` to be sure.
"""

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig

import pytest

from tests.helpers import ROOT, xla_flags

pytestmark = pytest.mark.slow  # end-to-end: `make test-slow` and CI run it, `make test` does not

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')


def _run(cmd, cwd, timeout=300):
  env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'VIRTUAL_ENV')}
  env.update(JAX_PLATFORMS='cpu', XLA_FLAGS=xla_flags(1))
  result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
  assert result.returncode == 0, f'{cmd}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}'
  return result


def _wheel(tmp_path) -> str:
  """Built from a copy of the sources, so nothing (build/, *.egg-info) is written into the checkout."""
  src = tmp_path / 'src'
  shutil.copytree(os.path.join(ROOT, 'effjax'), src / 'effjax', ignore=shutil.ignore_patterns('__pycache__'))
  for name in ('pyproject.toml', 'README.md'):
    shutil.copy(os.path.join(ROOT, name), src / name)
  _run(
    [
      sys.executable,
      '-m',
      'pip',
      'wheel',
      '--no-deps',
      '--no-build-isolation',
      '-q',
      '-w',
      str(tmp_path / 'dist'),
      str(src),
    ],
    cwd=tmp_path,
  )
  (wheel,) = (tmp_path / 'dist').iterdir()
  return str(wheel)


def _tiny_gpt2(hf_dir) -> None:
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # pylint: disable=import-outside-toplevel

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(
    ['def add(x, y):\n    return x + y\n'] * 20,
    trainer=trainers.BpeTrainer(
      vocab_size=300,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      special_tokens=['<|endoftext|>'],
      show_progress=False,
    ),
  )
  torch.manual_seed(0)
  config = transformers.GPT2Config(vocab_size=300, n_positions=32, n_embd=32, n_layer=2, n_head=4)
  transformers.GPT2LMHeadModel(config).save_pretrained(hf_dir, safe_serialization=True)
  (hf_dir / 'tokenizer.json').write_text(tok.to_str())


def test_installed_wheel_works_from_any_directory(tmp_path, corpus_dir):
  wheel = _wheel(tmp_path)
  venv = tmp_path / 'venv'
  subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(venv)], check=True)
  python = str(venv / 'bin' / 'python')
  new_site = subprocess.run(
    [python, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
    capture_output=True,
    text=True,
    check=True,
  ).stdout.strip()
  deps = [p for p in {sysconfig.get_paths()['purelib'], *site.getsitepackages()} if os.path.isdir(p)]
  with open(os.path.join(new_site, '_effjax_test_dependencies.pth'), 'w', encoding='utf-8') as f:
    f.write('\n'.join(deps) + '\n')
  _run(
    [sys.executable, '-m', 'pip', '--python', python, 'install', '-q', '--no-deps', '--no-index', wheel], cwd=tmp_path
  )

  away = tmp_path / 'elsewhere'
  away.mkdir()
  where = _run([python, '-c', 'import effjax, effjax.configs.gpt; print(effjax.__file__)'], cwd=away).stdout
  assert where.strip().startswith(new_site), where

  effjax = str(venv / 'bin' / 'effjax')
  _run(
    [
      effjax,
      '--config=gpt:tiny',
      '--workdir=run',
      f'--config.data.corpus={corpus_dir}',
      '--config.train.steps=4',
      '--config.train.log_every=2',
      '--config.checkpoint.every=4',
    ],
    cwd=away,
  )
  assert json.loads((away / 'run' / 'config.json').read_text())['train']['steps'] == 4
  sample = _run([effjax, '--workdir=run', '--mode=sample', '--prompt=def ', '--max_new_tokens=8'], cwd=away)
  assert sample.stdout.startswith('def ')
  _run([effjax, '--workdir=run', '--mode=export', '--export_dir=export'], cwd=away)

  _tiny_gpt2(away / 'gpt2')
  _run([python, '-m', 'effjax.convert.hf_gpt2', '--hf_dir=gpt2', '--export_dir=gpt2_export'], cwd=away)
  loaded = _run(
    [
      python,
      '-c',
      'import effjax, jax.numpy as jnp\n'
      'for e in ("export", "gpt2_export"):\n'
      '  model, variables, config = effjax.load_export(e)\n'
      '  print(e, model.apply(variables, jnp.zeros((1, 4), jnp.int32)).shape)',
    ],
    cwd=away,
  )
  lines = loaded.stdout.splitlines()
  assert lines[0].startswith('export (1, 4, ') and lines[1] == 'gpt2_export (1, 4, 300)'
