"""Everything about weights on disk.

load.py (the one entry, `load(path, model_cfg)`) reads through formats.py (containers),
layouts.py (each family's key tables), fit.py (shapes, position embeddings) and
diagnose.py (what does not fit, and the fix); checkpoints.py saves and restores the
train state with orbax; exports.py writes and reads adapter exports; integrity.py
holds the hash manifests and the value checks every loaded tensor passes.
"""
from adaptformer_jax.weights.load import load

__all__ = ['load']
