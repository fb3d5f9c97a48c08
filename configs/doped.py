"""Doped GPT (seed 004, §3): trainable transformer blocks with frozen random MLPs (hidden 6·d) between them, the

The presets and defaults live in the library (effjax/configs/doped.py);
this file keeps `--config=configs/doped.py[:preset]` working from the repository root.
"""

from effjax.configs.doped import get_config  # noqa: F401
