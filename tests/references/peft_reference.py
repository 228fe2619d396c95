"""SSF and Adapter+ as their authors wrote them, on timm's VisionTransformer (test references).

Independent PyTorch ports, checked once (2026-12-07, timm 1.0.31, CPU torch) against
the official code: dongzelian/SSF e94e0e7 models/vision_transformer.py with
tuning_mode='ssf' (global_pool 'token' and 'avg'), and visinf/adapter_plus 191c4ab
adapter_plus/vit_adapter.py with conf/adapter/adapter_plus.yaml (placements post, pre,
intermediate, parallel). Random weights loaded strictly from the official model into
the port: identical state-dict keys, logits within 1.2e-7 relative (SSF) and bit-identical
(Adapter+). CI cannot fetch the authors' repositories, so tests compare to these ports.
"""
import types

import torch
from torch import nn


def add_ssf(model: nn.Module) -> nn.Module:
  """Official SSF on a timm VisionTransformer: `ssf_scale_N`/`ssf_shift_N` pairs on the
  module the official code puts them on, applied (out * scale + shift) to the output
  of the patch embedding, norm1/norm2 (the Block's _1/_2), qkv and proj (Attention's
  _1/_2), fc1 and fc2 (Mlp's _1/_2, fc1's before the GELU) and the final norm
  (VisionTransformer's _1). Init as `init_ssf_scale_shift`: N(1, .02), N(0, .02)."""

  def attach(owner, index, site, dim):
    scale = nn.Parameter(torch.empty(dim).normal_(1, .02))
    shift = nn.Parameter(torch.empty(dim).normal_(0, .02))
    owner.register_parameter(f'ssf_scale_{index}', scale)
    owner.register_parameter(f'ssf_shift_{index}', shift)
    site.register_forward_hook(lambda module, args, out: out * scale + shift)

  width = model.embed_dim
  attach(model.patch_embed, 1, model.patch_embed, width)
  for block in model.blocks:
    attach(block, 1, block.norm1, width)
    attach(block, 2, block.norm2, width)
    attach(block.attn, 1, block.attn.qkv, 3 * width)
    attach(block.attn, 2, block.attn.proj, width)
    attach(block.mlp, 1, block.mlp.fc1, block.mlp.fc1.out_features)
    attach(block.mlp, 2, block.mlp.fc2, width)
  attach(model, 1, model.norm, width)  # official: after forward_features' norm
  return model


class AdapterPlus(nn.Module):
  """The official `Adapter` with Adapter+'s options: no norm, GELU, biases, channel
  scaling (on the whole up projection, its bias included), Houlsby init."""

  def __init__(self, width: int, dim: int):
    super().__init__()
    self.bottleneck = nn.Sequential(nn.Identity(), nn.Linear(width, dim), nn.GELU(),
                                    nn.Identity(), nn.Linear(dim, width))
    self.scaling = nn.Parameter(torch.ones(width))
    for linear in (self.bottleneck[1], self.bottleneck[4]):
      nn.init.trunc_normal_(linear.weight, std=.01, a=-.02, b=.02)
      nn.init.zeros_(linear.bias)

  def forward(self, x, skip=None):
    y = self.bottleneck(x) * self.scaling
    return y if skip is None else y + skip


def _attention(block, x):
  return x + block.drop_path1(block.ls1(block.attn(block.norm1(x))))


def _mlp(block, x):
  return block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def _post(block, x):
  x = _attention(block, x)
  x = x + _mlp(block, x)
  return block.adapter(x, skip=x)


def _pre(block, x):
  x = _attention(block, x)
  x = block.adapter(x, skip=x)
  return x + _mlp(block, x)


def _intermediate(block, x):
  x = _attention(block, x)
  y = _mlp(block, x)
  return x + block.adapter(y, skip=y)


def _parallel(block, x):
  y = _attention(block, x)
  return block.adapter(y, skip=y + _mlp(block, y))


# The official AdapterBlock.forward_<placement>.
PLACEMENTS = {'post': _post, 'pre': _pre, 'intermediate': _intermediate,
              'parallel': _parallel}


def add_adapter_plus(model: nn.Module, dim: int = 8, placement: str = 'post') -> nn.Module:
  """Official Adapter+ on a timm VisionTransformer: `blocks.N.adapter` with the block's
  forward of `placement`."""
  for block in model.blocks:
    block.adapter = AdapterPlus(model.embed_dim, dim)
    block.forward = types.MethodType(PLACEMENTS[placement], block)
  return model
