"""Shared test fixtures: tiny models that compile in seconds on a 2-core CPU."""
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import pytest  # noqa: E402

from adaptformer_jax import models  # noqa: E402


def tiny_cfg(**overrides):
  """A width-32, depth-2, 32 px ViT (8 px patches) for tests."""
  base = dict(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=8,
              image_size=32, num_classes=5)
  base.update(overrides)
  adapter = dict(bottleneck=8)
  adapter.update(base.pop('adapter', {}))
  return models.preset('vit_ti16', adapter=adapter, **base)


@pytest.fixture
def tiny():
  return tiny_cfg
