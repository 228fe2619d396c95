"""AdaptFormer parameter-efficient fine-tuning of Vision Transformers in JAX/Flax."""
from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
  """`adaptformer_jax.merge_tuning`, imported on first use: the package's own import stays
  free of JAX, so `python -m adaptformer_jax.main --help` starts fast."""
  if name == 'merge_tuning':
    from adaptformer_jax.models.merge import merge_tuning  # pylint: disable=g-import-not-at-top
    return merge_tuning
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
