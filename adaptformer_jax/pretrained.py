"""The documented entry point for pretrained checkpoints: `pretrained.load(path, config)`.

The loader lives in the `weights` package (weights/load.py and its helpers).
"""
from adaptformer_jax.weights.fit import resample_posemb
from adaptformer_jax.weights.formats import container
from adaptformer_jax.weights.load import load

__all__ = ['container', 'load', 'resample_posemb']
