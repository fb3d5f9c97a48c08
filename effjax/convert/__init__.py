"""Interop with other checkpoint formats. `effjax.convert.hf_gpt2`: Hugging Face GPT-2 <-> effjax export."""
