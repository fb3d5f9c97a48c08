"""p-gpt (ParallelGPT, arXiv 2404.14462): two parallel decoders of L/2 blocks, mixed by softmax-normalised learned

The presets and defaults live in the library (effjax/configs/pgpt.py);
this file keeps `--config=configs/pgpt.py[:preset]` working from the repository root.
"""

from effjax.configs.pgpt import get_config  # noqa: F401
