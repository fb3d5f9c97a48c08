"""Every command in README.md and launch/README.md works as written.

The fenced blocks of a document run in order, in one scratch directory that holds links to the repository's
`configs/`, `launch/` and `experiments/` (so repository-relative commands work as they would from the root):
- ```bash blocks: each command (lines joined at a trailing backslash, `#` comment lines dropped) must exit 0.
  `effjax` is the installed console script, `python` this interpreter; nothing is appended to a command, except:
  a launcher that would create cloud resources (`bash launch/tpu_vm.sh`, `bash launch/gpu_slurm.sh`) runs with
  `--dry-run` added, which parses every argument and prints what it would run.
- ```python blocks run as a script in the same directory.
- ```text blocks (and blocks with no language) are output or synopses, not commands.
Not run here, each for its stated reason (SKIPPED_PROGRAMS): `make` targets (make test runs this suite, make demo
is timed on its own), `pip install` (tests/test_wheel.py installs the built wheel), `tensorboard` (a server that
runs until stopped) and the cloud CLIs (`gcloud`, `gsutil`, `sbatch`: they need an account and a cluster).
"""

import os
import re
import shlex
import subprocess
import sys

import pytest

from tests.helpers import ROOT, xla_flags

pytestmark = pytest.mark.slow  # end-to-end: `make test-slow` and CI run it, `make test` does not

SKIPPED_PROGRAMS = ('make', 'pip', 'tensorboard', 'gcloud', 'gsutil', 'sbatch')
DRY_RUN_LAUNCHERS = ('launch/tpu_vm.sh', 'launch/gpu_slurm.sh')
FENCE = re.compile(r'^```(\w*)[^\n]*\n(.*?)^```', re.S | re.M)


def blocks(text: str):
  """(language, body) of each fenced block."""
  return [(m.group(1), m.group(2)) for m in FENCE.finditer(text)]


def commands(body: str) -> list[str]:
  joined = re.sub(r'\s*\\\n\s*', ' ', body)
  return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith('#')]


def _words(command: str) -> list[str]:
  words = shlex.split(command, comments=True)
  while words and re.match(r'^\w+=', words[0]):  # VAR=value prefixes
    words = words[1:]
  return words


def runnable(command: str) -> bool:
  return not any(p in SKIPPED_PROGRAMS for p in [_words(command)[0]] + re.findall(r'&&\s*(\S+)', command))


def as_run(command: str) -> str:
  for launcher in DRY_RUN_LAUNCHERS:
    if f'bash {launcher}' in command and '--dry-run' not in command:
      return command.replace(f'bash {launcher}', f'bash {launcher} --dry-run', 1)
  return command


def _env() -> dict:
  env = {**os.environ, 'XLA_FLAGS': xla_flags(1)}  # one device, as a user's shell has
  env['PATH'] = os.path.dirname(sys.executable) + os.pathsep + env.get('PATH', '')  # effjax, python
  env['JAX_PLATFORMS'] = 'cpu'
  return env


@pytest.mark.parametrize('document', ['README.md', 'launch/README.md'])
def test_every_documented_command_runs(document, tmp_path):
  with open(os.path.join(ROOT, document), encoding='utf-8') as f:
    found = blocks(f.read())
  for name in ('configs', 'launch', 'experiments'):
    os.symlink(os.path.join(ROOT, name), tmp_path / name)
  ran = 0
  for language, body in found:
    if language in ('bash', 'sh', 'shell'):
      for command in filter(runnable, commands(body)):
        result = subprocess.run(
          ['bash', '-c', as_run(command)],
          cwd=tmp_path,
          env=_env(),
          capture_output=True,
          text=True,
          timeout=600,
          check=False,
        )
        assert result.returncode == 0, f'{document}: {command}\n{result.stdout[-1500:]}\n{result.stderr[-3000:]}'
        ran += 1
    elif language == 'python':
      result = subprocess.run(
        [sys.executable, '-c', body], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600, check=False
      )
      assert result.returncode == 0, f'{document}: python block\n{body}\n{result.stderr[-3000:]}'
      ran += 1
  assert ran >= 3, f'{document}: only {ran} commands found'


def test_the_harness_reads_commands_as_written():
  text = '```bash\nA=1 effjax --x \\\n    --y   # note\n# a comment\nmake demo\n```\n```text\nnot run\n```\n'
  (language, body), (other, _) = blocks(text)
  assert (language, other) == ('bash', 'text')
  assert commands(body) == ['A=1 effjax --x --y   # note', 'make demo']
  assert [runnable(c) for c in commands(body)] == [True, False]
  assert as_run('bash launch/tpu_vm.sh --name x') == 'bash launch/tpu_vm.sh --dry-run --name x'
  assert not runnable('pip install tensorboard && tensorboard --logdir runs/')
