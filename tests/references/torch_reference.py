"""A compact PyTorch port of the official AdaptFormer ViT: the independent test reference.

It follows ShoufaChen/AdaptFormer (models/vit_image.py, built on MAE's ViT):
module and parameter names are the official ones, so `state_dict()` is the
official checkpoint layout, and `fused_layout` turns it into MAE/timm's.
"""
import numpy as np
import torch
from torch import nn


class Adapter(nn.Module):
  """Official `Adapter`: down -> ReLU -> dropout -> up, times scale; LN 'in' or 'out'."""

  def __init__(self, d, bottleneck, scale, layernorm):
    super().__init__()
    self.adapter_layernorm_option = layernorm
    self.adapter_layer_norm_before = nn.LayerNorm(d) if layernorm in ('in', 'out') else None
    self.scale = nn.Parameter(torch.ones(1)) if scale == 'learnable' else float(scale)
    self.down_proj = nn.Linear(d, bottleneck)
    self.non_linear_func = nn.ReLU()
    self.up_proj = nn.Linear(bottleneck, d)
    self.dropout = 0.1

  def forward(self, x, add_residual=True, residual=None):
    residual = x if residual is None else residual
    if self.adapter_layernorm_option == 'in':
      x = self.adapter_layer_norm_before(x)
    down = self.non_linear_func(self.down_proj(x))
    down = nn.functional.dropout(down, p=self.dropout, training=self.training)
    up = self.up_proj(down) * self.scale
    if self.adapter_layernorm_option == 'out':
      up = self.adapter_layer_norm_before(up)
    return up + residual if add_residual else up


class Attention(nn.Module):
  """Official attention: separate q/k/v projections (bias on), explicit softmax."""

  def __init__(self, dim, num_heads):
    super().__init__()
    self.num_heads = num_heads
    self.scale = (dim // num_heads) ** -0.5
    self.q_proj = nn.Linear(dim, dim)
    self.v_proj = nn.Linear(dim, dim)
    self.k_proj = nn.Linear(dim, dim)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, n, c = x.shape
    heads = lambda t: t.reshape(b, n, self.num_heads, -1).transpose(1, 2)
    q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
    attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
    return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
  """Official block: fc1/fc2 directly on the block, adapter parallel or sequential."""

  def __init__(self, dim, num_heads, mlp_dim, adapter):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.attn = Attention(dim, num_heads)
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.fc1 = nn.Linear(dim, mlp_dim)
    self.fc2 = nn.Linear(mlp_dim, dim)
    self.act = nn.GELU()
    self.ffn_option = adapter and adapter['placement']
    if adapter:
      self.adaptmlp = Adapter(dim, adapter['bottleneck'], adapter['scale'],
                              adapter['layernorm'])

  def forward(self, x):
    x = x + self.attn(self.norm1(x))
    if self.ffn_option == 'parallel':
      adapt_x = self.adaptmlp(x, add_residual=False)
    residual = x
    x = self.fc2(self.act(self.fc1(self.norm2(x))))
    if self.ffn_option == 'sequential':
      x = self.adaptmlp(x)
    elif self.ffn_option == 'parallel':
      x = x + adapt_x
    return residual + x


class VisionTransformer(nn.Module):
  """Official ViT (MAE-style): VPT-deep `embeddings`, cls+norm or gap+fc_norm, BN head."""

  def __init__(self, cfg):
    super().__init__()
    methods = str(cfg.tuning).split('+')
    adapter = dict(cfg.adapter) if 'adaptformer' in methods else None
    d, p = cfg.width, cfg.patch_size
    self.patch_embed = nn.Module()
    self.patch_embed.proj = nn.Conv2d(3, d, p, stride=p)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
    self.pos_embed = nn.Parameter(torch.zeros(1, (cfg.image_size // p) ** 2 + 1, d))
    self.vpt_num = cfg.vpt.num_tokens if 'vpt_deep' in methods else 0
    if self.vpt_num:
      self.embeddings = nn.ParameterList(
          [nn.Parameter(torch.zeros(1, self.vpt_num, d)) for _ in range(cfg.depth)])
    self.blocks = nn.ModuleList(
        [Block(d, cfg.num_heads, cfg.mlp_dim, adapter) for _ in range(cfg.depth)])
    self.global_pool = cfg.pool == 'gap'
    if self.global_pool:
      self.fc_norm = nn.LayerNorm(d, eps=1e-6)
    else:
      self.norm = nn.LayerNorm(d, eps=1e-6)
    linear = nn.Linear(d, cfg.num_classes)
    self.head = nn.Sequential(nn.BatchNorm1d(d, affine=False, eps=1e-6), linear) \
        if cfg.head == 'bn_linear' else linear

  def forward(self, x):
    b = x.shape[0]
    x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
    x = torch.cat((self.cls_token.expand(b, -1, -1), x), dim=1) + self.pos_embed
    for idx, blk in enumerate(self.blocks):
      if self.vpt_num:
        x = torch.cat([self.embeddings[idx].expand(b, -1, -1), x], dim=1)
      x = blk(x)
      if self.vpt_num:
        x = x[:, self.vpt_num:, :]
    if self.global_pool:
      x = self.fc_norm(x[:, 1:, :].mean(dim=1))
    else:
      x = self.norm(x)[:, 0]
    return self.head(x)


def randomized(cfg, seed=0, model_cls=None):
  """The reference model for `cfg` in eval mode, every weight random and non-zero.

  Adapters get non-zero up projections (the official init zeroes them), LN
  scales are near 1, and BatchNorm running statistics are non-trivial.
  """
  torch.manual_seed(seed)
  model = (model_cls or VisionTransformer)(cfg)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith('.scale') or (p.ndim == 1 and 'norm' in name and name.endswith('weight')):
        p.copy_(1 + 0.1 * torch.randn_like(p))  # LayerNorm and learnable adapter scales
      elif name.endswith('weight'):
        p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)  # unit-variance outputs
      else:
        p.copy_(0.3 * torch.randn_like(p))  # biases, tokens, position embeddings
    for m in model.modules():
      if isinstance(m, nn.BatchNorm1d):
        m.running_mean.copy_(0.3 * torch.randn_like(m.running_mean))
        m.running_var.copy_(0.5 + torch.rand_like(m.running_var))
  return model.eval()


def logits(model, images_nhwc):
  """Reference logits for NHWC numpy images."""
  with torch.no_grad():
    x = torch.from_numpy(np.asarray(images_nhwc, np.float32)).permute(0, 3, 1, 2)
    return model(x).numpy()


def fused_layout(state_dict):
  """The official layout converted to MAE/timm's: fused `attn.qkv`, `mlp.fc1/fc2`."""
  out = {}
  for name, value in state_dict.items():
    if '.attn.q_proj.' in name:
      parts = [state_dict[name.replace('q_proj', p)] for p in ('q_proj', 'k_proj', 'v_proj')]
      out[name.replace('q_proj', 'qkv')] = torch.cat(parts, dim=0)
    elif '.attn.k_proj.' in name or '.attn.v_proj.' in name:
      continue
    else:
      out[name.replace('.fc1.', '.mlp.fc1.').replace('.fc2.', '.mlp.fc2.')] = value
  return out
