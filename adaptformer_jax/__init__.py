"""AdaptFormer parameter-efficient fine-tuning of Vision Transformers in JAX/Flax."""

__version__ = "0.1.0"
