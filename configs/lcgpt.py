"""lc-gpt (LinearlyCompressedGPT, arXiv 2404.14462): after every n=model.compress.compress_every blocks a
Linear(d, d/f) ...

The presets and defaults live in the library (effjax/configs/lcgpt.py);
this file keeps `--config=configs/lcgpt.py[:preset]` working from the repository root.
"""

from effjax.configs.lcgpt import get_config  # noqa: F401
