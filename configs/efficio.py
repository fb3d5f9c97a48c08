"""GPT-Efficio (arXiv 2309.06589): one transformer block applied at every layer (cross-layer sharing with nn.scan,

The presets and defaults live in the library (effjax/configs/efficio.py);
this file keeps `--config=configs/efficio.py[:preset]` working from the repository root.
"""

from effjax.configs.efficio import get_config  # noqa: F401
