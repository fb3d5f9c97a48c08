"""The accelerator and storage extras resolve against the package registry, as the launchers install them.

One real `pip install --dry-run` of `.[cuda,tpu,gcs]` (pip's resolver, the registry pip is configured with, no
download of the big wheels themselves): the CUDA plugin and PJRT at exactly our jax version, libtpu, and the gs://
clients. If one of them could not be resolved pip exits non-zero and the test fails with pip's own message.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.slow  # end-to-end: `make test-slow` and CI run it, `make test` does not


def _version(report: dict, name: str) -> str:
  """The version pip would install, else the one already installed (what the launchers would then use)."""
  for item in report['install']:
    if item['metadata']['name'].lower().replace('_', '-') == name:
      return item['metadata']['version']
  return importlib.metadata.version(name)


def test_cuda_tpu_and_gcs_extras_resolve_at_our_jax_version(tmp_path):
  report_path = tmp_path / 'report.json'
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'pip',
      'install',
      '--dry-run',
      '--quiet',
      '--no-build-isolation',
      '--report',
      str(report_path),
      '.[cuda,tpu,gcs]',
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(report_path.read_text())
  jax_version = _version(report, 'jax')
  assert jax_version.startswith('0.10.')  # our pin: jax>=0.10.2,<0.11
  assert _version(report, 'jax-cuda12-plugin') == jax_version
  assert _version(report, 'jax-cuda12-pjrt') == jax_version
  assert _version(report, 'jaxlib') == jax_version
  assert _version(report, 'libtpu')
  assert _version(report, 'nvidia-cudnn-cu12').startswith('9.')
  for name in ('gcsfs', 'google-cloud-storage'):
    assert _version(report, name)
