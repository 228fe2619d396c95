"""The documented entry point for trainable masks and freezing; they live with the
tuning methods in `models/tuning.py`."""
from adaptformer_jax.models.tuning import apply_updates
from adaptformer_jax.models.tuning import count
from adaptformer_jax.models.tuning import freeze
from adaptformer_jax.models.tuning import stop_frozen_gradients
from adaptformer_jax.models.tuning import store_frozen
from adaptformer_jax.models.tuning import trainable_mask
from adaptformer_jax.models.tuning import trainable_rules

__all__ = ['apply_updates', 'count', 'freeze', 'stop_frozen_gradients', 'store_frozen',
           'trainable_mask', 'trainable_rules']
