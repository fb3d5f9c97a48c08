"""cc-gpt (ConvCompressedGPT, arXiv 2404.14462): lc-gpt with each compressor a Conv1d over time

The presets and defaults live in the library (effjax/configs/ccgpt.py);
this file keeps `--config=configs/ccgpt.py[:preset]` working from the repository root.
"""

from effjax.configs.ccgpt import get_config  # noqa: F401
