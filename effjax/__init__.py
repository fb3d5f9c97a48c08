"""effjax: a JAX/Flax stack for parameter- and compute-efficient language models."""

__version__ = '0.1.0'


def load_export(export_dir: str):
  """Returns (model, variables, config) from an export made by `--mode=export` (no training workdir needed)."""
  from effjax import checkpoint  # pylint: disable=import-outside-toplevel

  return checkpoint.load_export(export_dir)
