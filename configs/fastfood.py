"""Adaptive FastFood MLPs (seed 004, §4): both MLP linear layers are y = c·S H G Π H B x (three learned diagonals,

The presets and defaults live in the library (effjax/configs/fastfood.py);
this file keeps `--config=configs/fastfood.py[:preset]` working from the repository root.
"""

from effjax.configs.fastfood import get_config  # noqa: F401
