"""The library's own defaults: `base.get_base()` plus one module per built-in variant with `get_config(preset)`.

Installed with the package, so the variants are reachable by name from any directory; the repository's top-level
`configs/*.py` are thin files that re-export these.
"""
