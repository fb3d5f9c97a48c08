"""Block-diagonal MLPs (seed 004, §4): each MLP linear layer is a block-diagonal matrix (model.dense.num_blocks
= 4 ...

The presets and defaults live in the library (effjax/configs/blockdiag.py);
this file keeps `--config=configs/blockdiag.py[:preset]` working from the repository root.
"""

from effjax.configs.blockdiag import get_config  # noqa: F401
