"""Model presets and construction."""
from adaptformer_jax.models.presets import build
from adaptformer_jax.models.presets import input_shape
from adaptformer_jax.models.presets import is_pretraining
from adaptformer_jax.models.presets import module
from adaptformer_jax.models.presets import preset
from adaptformer_jax.models.presets import PRESETS
