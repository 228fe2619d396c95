"""A compact PyTorch port of the official video AdaptFormer model: the independent test reference.

It follows ShoufaChen/AdaptFormer models/vit_video.py (VideoMAE's ViT with an
AdaptMLP per block): a Conv3d tubelet embedding, separate bias-free q/k/v
projections plus `q_bias`/`v_bias`, the fixed sinusoid table, mean pooling and
`fc_norm`. LayerScale (`gamma_1`/`gamma_2`) is VideoMAE's; the AdaptFormer video
code accepts `init_values` but never applies it. `state_dict()` is the official
AdaptFormer video layout; `videomae_layout` turns it into VideoMAE's files.
"""
import numpy as np
import torch
from torch import nn

from references import torch_reference


def get_sinusoid_encoding_table(n_position, d_hid):
  """VideoMAE's table, written out as there: angle pos / 10000^(2*(j//2)/d)."""
  table = np.array([[pos / np.power(10000, 2 * (j // 2) / d_hid) for j in range(d_hid)]
                    for pos in range(n_position)])
  table[:, 0::2] = np.sin(table[:, 0::2])
  table[:, 1::2] = np.cos(table[:, 1::2])
  return torch.FloatTensor(table).unsqueeze(0)


class Attention(nn.Module):
  """Official video attention: q/k/v weights without bias, then q_bias and v_bias."""

  def __init__(self, dim, num_heads):
    super().__init__()
    self.num_heads = num_heads
    self.scale = (dim // num_heads) ** -0.5
    self.q_proj = nn.Linear(dim, dim, bias=False)
    self.v_proj = nn.Linear(dim, dim, bias=False)
    self.k_proj = nn.Linear(dim, dim, bias=False)
    self.q_bias = nn.Parameter(torch.zeros(dim))
    self.v_bias = nn.Parameter(torch.zeros(dim))
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, n, c = x.shape
    heads = lambda t: t.reshape(b, n, self.num_heads, -1).transpose(1, 2)
    q = heads(nn.functional.linear(x, self.q_proj.weight, self.q_bias))
    k = heads(nn.functional.linear(x, self.k_proj.weight))
    v = heads(nn.functional.linear(x, self.v_proj.weight, self.v_bias))
    attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Block(torch_reference.Block):
  """Official video block: the image block (fc1/fc2 on the block) with the video
  attention, and VideoMAE's optional LayerScale on the attention and MLP outputs."""

  def __init__(self, dim, num_heads, mlp_dim, adapter, init_values):
    super().__init__(dim, num_heads, mlp_dim, adapter)
    self.attn = Attention(dim, num_heads)
    if init_values is not None:
      self.gamma_1 = nn.Parameter(init_values * torch.ones(dim))
      self.gamma_2 = nn.Parameter(init_values * torch.ones(dim))
      self.attn.register_forward_hook(lambda module, args, out: self.gamma_1 * out)
      self.fc2.register_forward_hook(lambda module, args, out: self.gamma_2 * out)


class VisionTransformer(nn.Module):
  """Official video ViT: tubelets, sinusoid table, VPT-deep `embeddings`, mean pool + fc_norm."""

  def __init__(self, cfg):
    super().__init__()
    methods = str(cfg.tuning).split('+')
    adapter = dict(cfg.adapter) if 'adaptformer' in methods else None
    d, p, t = cfg.width, cfg.patch_size, cfg.tubelet
    self.patch_embed = nn.Module()
    self.patch_embed.proj = nn.Conv3d(3, d, (t, p, p), stride=(t, p, p))
    num_patches = (cfg.num_frames // t) * (cfg.image_size // p) ** 2
    self.pos_embed = get_sinusoid_encoding_table(num_patches, d)  # not a parameter
    self.vpt_num = cfg.vpt.num_tokens if 'vpt_deep' in methods else 0
    if self.vpt_num:
      self.embeddings = nn.ParameterList(
          [nn.Parameter(torch.zeros(1, self.vpt_num, d)) for _ in range(cfg.depth)])
    self.blocks = nn.ModuleList(
        [Block(d, cfg.num_heads, cfg.mlp_dim, adapter, cfg.layerscale)
         for _ in range(cfg.depth)])
    self.fc_norm = nn.LayerNorm(d, eps=1e-6)
    linear = nn.Linear(d, cfg.num_classes)
    self.head = nn.Sequential(nn.BatchNorm1d(d, affine=False, eps=1e-6), linear) \
        if cfg.head == 'bn_linear' else linear

  def forward(self, x):
    x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
    b = x.shape[0]
    x = x + self.pos_embed.expand(b, -1, -1).type_as(x)
    for idx, blk in enumerate(self.blocks):
      if self.vpt_num:
        x = torch.cat([self.embeddings[idx].expand(b, -1, -1), x], dim=1)
      x = blk(x)
      if self.vpt_num:
        x = x[:, self.vpt_num:, :]
    return self.head(self.fc_norm(x.mean(1)))


def randomized(cfg, seed=0):
  """The reference model for `cfg` in eval mode, every weight random and non-zero."""
  return torch_reference.randomized(cfg, seed, VisionTransformer)


def logits(model, videos_nthwc):
  """Reference logits for (B, T, H, W, C) numpy clips (torch wants B, C, T, H, W)."""
  with torch.no_grad():
    x = torch.from_numpy(np.asarray(videos_nthwc, np.float32)).permute(0, 4, 1, 2, 3)
    return model(x).numpy()


def videomae_layout(state_dict, pretrain):
  """The backbone as VideoMAE saves it: fused `attn.qkv`, `mlp.fc1/fc2`, no adapters.

  pretrain=True: the pre-training file, {'model': ...} with `encoder.` keys, an
  `encoder.norm`, the decoder and mask token, and no fc_norm or head.
  pretrain=False: a fine-tuned file, plain keys wrapped under 'module'.
  """
  out = {}
  for name, value in state_dict.items():
    if '.adaptmlp.' in name or name.startswith('embeddings.') or '.attn.k_proj.' in name \
        or '.attn.v_proj.' in name or (pretrain and name.startswith(('fc_norm.', 'head.'))):
      continue
    if '.attn.q_proj.' in name:
      parts = [state_dict[name.replace('q_proj', p)] for p in ('q_proj', 'k_proj', 'v_proj')]
      out[name.replace('q_proj', 'qkv')] = torch.cat(parts, dim=0)
    else:
      out[name.replace('.fc1.', '.mlp.fc1.').replace('.fc2.', '.mlp.fc2.')] = value
  if not pretrain:
    return {'module': out}
  d = state_dict['fc_norm.weight'].shape[0]
  out = {f'encoder.{k}': v for k, v in out.items()}
  out.update({
      'encoder.norm.weight': torch.randn(d), 'encoder.norm.bias': torch.randn(d),
      'encoder_to_decoder.weight': torch.randn(8, d), 'mask_token': torch.randn(1, 1, 8),
      'decoder.blocks.0.norm1.weight': torch.randn(8), 'decoder.norm.weight': torch.randn(8),
      'decoder.head.weight': torch.randn(6, 8), 'decoder.head.bias': torch.randn(6)})
  return {'model': out}
