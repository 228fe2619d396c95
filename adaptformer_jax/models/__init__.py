"""Model presets and construction."""
from adaptformer_jax.models.presets import build
from adaptformer_jax.models.presets import preset
from adaptformer_jax.models.presets import PRESETS
from adaptformer_jax.models.presets import tuning_methods
