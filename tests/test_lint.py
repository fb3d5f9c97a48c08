"""The whole tree passes `ruff check` and is as `ruff format` writes it, under pyproject.toml's [tool.ruff] settings
(two-space indents, single quotes, 120 columns): what CI runs too."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize('command', [['check'], ['format', '--check']], ids=['check', 'format'])
def test_ruff_is_clean_on_the_whole_tree(command):
  result = subprocess.run(
    [sys.executable, '-m', 'ruff', *command, '--no-cache', ROOT],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
