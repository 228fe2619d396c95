"""Independent PyTorch ports of RepAdapter and FacT on timm's ViT: the test references.

They follow the authors' code -- luogen1996/RepAdapter `repadapter.py` (`RepAdapter`,
`set_RepAdapter`, `forward_vit_block_adapter` / `forward_vit_attn_adapter`) and
JieShibo/PETL-ViT `FacT/fact_tt.py`, `FacT/fact_tk.py` (`set_FacT`, `fact_forward_attn`,
`fact_forward_mlp`) -- with their module and parameter names, so `state_dict()` is the
official checkpoint layout and `trained_state_dict` what their `save` functions write.
Where the official code hard-codes ViT-B (width 768, MLP 4 x 768, 12 layers, 2 groups)
these take the model's sizes. Checked once against the official files themselves
(width 768; FacT-TK at 12 layers): see the report of the commit that added them.
"""
import numpy as np
import torch
from torch import nn


class RepAdapter(nn.Module):
  """conv_B(dropout(conv_A(x))) * scale + x over (B, N, C) tokens, 1x1 convolutions."""

  def __init__(self, width, dim, groups, scale):
    super().__init__()
    self.conv_A = nn.Conv1d(width, dim, 1, groups=1, bias=True)
    self.conv_B = nn.Conv1d(dim, width, 1, groups=groups, bias=True)
    self.dropout = nn.Dropout(0.1)
    self.groups, self.scale = groups, scale
    nn.init.xavier_uniform_(self.conv_A.weight)
    for p in (self.conv_A.bias, self.conv_B.weight, self.conv_B.bias):
      nn.init.zeros_(p)

  def forward(self, x):
    x = x.transpose(1, 2)
    return (self.conv_B(self.dropout(self.conv_A(x))) * self.scale + x).transpose(1, 2)


def add_repadapter(model, dim, groups, scale, placement):
  """RepAdapters before every block's attention ('attn': repattn) and MLP ('block':
  repblock). The official block forward skips timm's LayerScale (ls1/ls2): so here."""
  width = model.embed_dim
  for block in model.blocks:
    block.adapter_attn = RepAdapter(width, dim, groups, scale)
    if placement == 'block':
      block.adapter_mlp = RepAdapter(width, dim, groups, scale)
    block.forward = _repadapter_block_forward(block, placement == 'block')
  return model


def _repadapter_block_forward(self, before_mlp):
  def forward(x):
    x = x + self.drop_path1(self.attn(self.adapter_attn(self.norm1(x))))
    h = self.norm2(x)
    return x + self.drop_path2(self.mlp(self.adapter_mlp(h) if before_mlp else h))
  return forward


def add_fact(model, kind, rank, scale):
  """FacT-TT / FacT-TK on every block (timm Attention and Mlp), factors on the model."""
  width, depth = model.embed_dim, len(model.blocks)
  chunks = model.blocks[0].mlp.fc1.out_features // width
  model.FacTu = nn.Linear(width, rank, bias=False)
  model.FacTv = nn.Linear(rank, width, bias=False)
  nn.init.zeros_(model.FacTv.weight)
  if kind == 'tk':
    model.FacTp = nn.Parameter(torch.zeros(rank, depth * (4 + 2 * chunks)))
    model.FacTc = nn.Parameter(torch.zeros(rank, rank, rank))
    nn.init.xavier_uniform_(model.FacTc)
    nn.init.xavier_uniform_(model.FacTp)
  for i, block in enumerate(model.blocks):
    attn, mlp = block.attn, block.mlp
    for m in (attn, mlp):
      m.dp, m.s, m.dim = nn.Dropout(0.1), scale, rank
    if kind == 'tt':
      for name in ('q', 'k', 'v', 'proj'):
        setattr(attn, f'{name}_FacTs', nn.Linear(rank, rank, bias=False))
      mlp.fc1_FacTs = nn.Linear(rank, rank * chunks, bias=False)
      mlp.fc2_FacTs = nn.Linear(chunks * rank, rank, bias=False)
    attn.idx, mlp.idx = i * (4 + 2 * chunks), i * (4 + 2 * chunks) + 4
    attn.forward = _fact_attn_forward(model, attn, kind)
    mlp.forward = _fact_mlp_forward(model, mlp, kind, chunks)
  return model


def _fact_attn_forward(vit, self, kind):
  """Official fact_forward_attn; `vit` the model holding the shared factors."""
  def core(x, name, j):
    u = vit.FacTu(x)
    if kind == 'tt':
      return getattr(self, f'{name}_FacTs')(u)
    cores = vit.FacTc @ vit.FacTp[:, self.idx:self.idx + 4]
    return u @ cores[:, :, j]

  def forward(x, attn_mask=None, is_causal=False):  # timm 1.0's Block passes both
    assert attn_mask is None and not is_causal
    b, n, c = x.shape
    qkv = self.qkv(x)
    qkv = qkv + torch.cat([vit.FacTv(self.dp(core(x, name, j)))
                           for j, name in enumerate('qkv')], dim=2) * self.s
    qkv = qkv.reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
    x = (attn @ v).transpose(1, 2).reshape(b, n, c)
    return self.proj(x) + vit.FacTv(self.dp(core(x, 'proj', 3))) * self.s
  return forward


def _fact_mlp_forward(vit, self, kind, chunks):
  """Official fact_forward_mlp, the MLP's 4 read as `chunks` (= mlp width / width)."""
  def forward(x):
    b, n, c = x.shape
    if kind == 'tt':
      fc1 = lambda u: self.fc1_FacTs(u)
      fc2 = lambda u: self.fc2_FacTs(u)
    else:
      cores = vit.FacTc @ vit.FacTp[:, self.idx:self.idx + 2 * chunks]
      fc1_core = cores[:, :, :chunks].reshape(self.dim, self.dim * chunks)
      fc2_core = cores[:, :, chunks:].reshape(self.dim, self.dim * chunks)
      fc1 = lambda u: u @ fc1_core
      fc2 = lambda u: u @ fc2_core.t()
    h = self.fc1(x)
    h = h + vit.FacTv(self.dp(fc1(vit.FacTu(x))).reshape(b, n, chunks, self.dim)).reshape(
        b, n, chunks * c) * self.s
    x = self.drop1(self.act(h))
    h = self.fc2(x)
    x = x.reshape(b, n, chunks, c)
    h = h + vit.FacTv(self.dp(fc2(vit.FacTu(x).reshape(b, n, chunks * self.dim)))) * self.s
    return self.drop2(h)
  return forward


def trained_state_dict(model, method):
  """What the official training scripts' `save` writes: the method's and the head's
  parameters ('adapter' or 'FacT' in the name, or 'head')."""
  word = 'adapter' if method == 'repadapter' else 'FacT'
  return {n: p.detach().clone() for n, p in model.named_parameters()
          if word in n or 'head' in n}


def backbone_state_dict(model):
  """The timm ViT's own keys: no method parameter."""
  return {k: v for k, v in model.state_dict().items() if 'adapter' not in k and 'FacT' not in k}


def logits(model, images_nhwc):
  with torch.no_grad():
    return model(torch.from_numpy(np.asarray(images_nhwc, np.float32)).permute(0, 3, 1, 2)).numpy()
