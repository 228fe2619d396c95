"""Models: `preset(name, **overrides)` describes one as a ConfigDict, `build(cfg)` makes
its Flax module; both validate the config against the schema first."""
from typing import Any

import flax.linen as nn
import ml_collections

from adaptformer_jax import schema
from adaptformer_jax.models import presets
from adaptformer_jax.models.presets import input_shape
from adaptformer_jax.models.presets import is_pretraining
from adaptformer_jax.models.presets import module
from adaptformer_jax.models.presets import PRESETS


def preset(name: str, **overrides: Any) -> ml_collections.ConfigDict:
  """A model ConfigDict for preset `name`, with top-level or nested overrides, validated.

  Nested sections take dicts: `preset('vit_b16', adapter=dict(bottleneck=16))`.
  Video presets (`videomae_*`) take clips (T, H, W, 3): see `input_shape`.
  """
  cfg = presets.defaults(name, **overrides)
  schema.validate_model(cfg)
  return cfg


def build(model_cfg: ml_collections.ConfigDict) -> nn.Module:
  """The Flax module for a model ConfigDict, validated first."""
  schema.validate_model(model_cfg)
  return module(model_cfg)
