"""GPT baseline: pre-LN causal transformer with tied embeddings.

The presets and defaults live in the library (effjax/configs/gpt.py);
this file keeps `--config=configs/gpt.py[:preset]` working from the repository root.
"""

from effjax.configs.gpt import get_config  # noqa: F401
