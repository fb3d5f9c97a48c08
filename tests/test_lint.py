"""The whole tree passes `ruff check` under pyproject.toml's [tool.ruff] settings (what CI runs too)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ruff_check_is_clean_on_the_whole_tree():
  result = subprocess.run([sys.executable, '-m', 'ruff', 'check', '--no-cache', ROOT], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
