"""timm's and OpenCLIP's own ViT code as test references (random weights, offline).

Both import torchvision at module level for data transforms and a frozen
BatchNorm that ViTs never use. torchvision's PyPI wheels do not load next to the
CPU torch pinned here (its compiled ops are missing), so when `import torchvision`
fails, `import_timm` puts empty stand-in modules in `sys.modules` first: the
model code under test is timm's and OpenCLIP's, unchanged; only their unused
torchvision imports resolve to placeholders. OpenCLIP's package __init__ also
loads tokenizers; `import_open_clip_transformer` loads just its model module.
"""
import enum
import importlib
import importlib.util
import sys
import types

import numpy as np
import pytest

_TORCHVISION_MODULES = (
    'torchvision', 'torchvision.datasets', 'torchvision.models',
    'torchvision.models.feature_extraction', 'torchvision.ops', 'torchvision.ops.misc',
    'torchvision.transforms', 'torchvision.transforms.functional',
    'torchvision.transforms.v2', 'torchvision.utils')


class _AnyAttribute(type):

  def __getattr__(cls, name):
    if name.startswith('__'):
      raise AttributeError(name)
    return cls


class _Placeholder(metaclass=_AnyAttribute):
  """Stands for any torchvision class or function the model code never calls."""

  def __init__(self, *args, **kwargs):
    del args, kwargs


def _placeholder_module(name):
  module = types.ModuleType(name)
  module.__path__ = []

  def getattr_(attr):
    if attr.startswith('__'):
      raise AttributeError(attr)
    return _Placeholder
  module.__getattr__ = getattr_
  return module


def _stub_torchvision():
  try:
    import torchvision  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    return
  except Exception:  # pylint: disable=broad-except
    for name in list(sys.modules):
      if name == 'torchvision' or name.startswith('torchvision.'):
        del sys.modules[name]
  for name in _TORCHVISION_MODULES:
    sys.modules[name] = _placeholder_module(name)
  # timm builds lookup tables from these enum members at import time.
  sys.modules['torchvision.transforms.functional'].InterpolationMode = enum.Enum(
      'InterpolationMode', 'NEAREST NEAREST_EXACT BILINEAR BICUBIC BOX HAMMING LANCZOS')


def import_timm():
  """timm, or a pytest skip when torch or timm is not installed."""
  pytest.importorskip('torch')
  if importlib.util.find_spec('timm') is None:
    pytest.skip('timm is not installed (pip install -r requirements-dev.txt)')
  _stub_torchvision()
  return importlib.import_module('timm')


def import_open_clip_transformer():
  """open_clip.transformer (OpenCLIP's VisionTransformer) without open_clip/__init__."""
  pytest.importorskip('torch')
  if 'open_clip' in sys.modules:
    return importlib.import_module('open_clip.transformer')
  spec = importlib.util.find_spec('open_clip')
  if spec is None:
    pytest.skip('open_clip_torch is not installed (pip install -r requirements-dev.txt)')
  _stub_torchvision()
  package = types.ModuleType('open_clip')
  package.__path__ = list(spec.submodule_search_locations)
  sys.modules['open_clip'] = package
  return importlib.import_module('open_clip.transformer')


def randomize(model, seed=0):
  """Every parameter of `model` random and non-trivial; returns it in eval mode.

  Norm scales near 1, LayerScale gammas near 0.5 (their init, 1e-5, would hide
  the branch they scale), weights with unit-variance outputs, biases and tokens O(0.3).
  """
  import torch  # pylint: disable=g-import-not-at-top
  gen = torch.Generator().manual_seed(seed)
  randn = lambda p: torch.randn(p.shape, generator=gen)
  with torch.no_grad():
    for name, p in model.named_parameters():
      leaf = name.rsplit('.', 1)[-1]
      is_norm = any(s in name for s in ('norm', 'ln_')) and p.ndim == 1
      if leaf == 'gamma':
        p.copy_(0.5 + 0.1 * randn(p))
      elif is_norm and leaf == 'weight':
        p.copy_(1 + 0.1 * randn(p))
      elif p.ndim >= 2 and leaf not in ('cls_token', 'pos_embed', 'reg_token', 'latent',
                                        'class_embedding', 'positional_embedding'):
        fan_in = p.shape[0] if name == 'proj' else p[0].numel()  # OpenCLIP: x @ proj
        p.copy_(randn(p) / fan_in ** 0.5)
      else:
        p.copy_(0.3 * randn(p))
  return model.eval()


def logits(model, images_nhwc):
  """The model's output for NHWC numpy images, as numpy."""
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    x = torch.from_numpy(np.asarray(images_nhwc, np.float32)).permute(0, 3, 1, 2)
    return model(x).numpy()


def state_dict_numpy(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
