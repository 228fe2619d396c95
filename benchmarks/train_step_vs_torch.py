"""Is our AdaptFormer train step as fast as a well-written PyTorch one?

ViT-B/16, 224 px, SGD with momentum, AdaptFormer (official defaults: bottleneck 64,
scale 0.1, dropout 0.1, parallel to the MLP) with a frozen backbone. Ours is the
training loop's own jitted step (`train.Trainer(...).jit_train_step()`); PyTorch's is
written as a performance-minded user would: fused qkv, F.scaled_dot_product_attention,
requires_grad=False on the backbone, momentum SGD on the trainable leaves only, and
torch.compile when it is faster than eager. The steps alternate, so all see the
same machine load; the last line is our median step time / PyTorch's best median.
On a GPU both also report MFU (FLOPs from XLA's cost analysis, bf16 dense peak).

  python benchmarks/train_step_vs_torch.py [--batch 8] [--repeats 7] [--dtype bfloat16]
"""
import argparse
import math
import os
import statistics
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from adaptformer_jax import models  # noqa: E402
from adaptformer_jax import recipes  # noqa: E402
from adaptformer_jax import train  # noqa: E402

NUM_CLASSES = 100
# Dense bf16 peak FLOP/s by device kind (a substring of jax's device_kind; H100 = SXM).
PEAK_FLOPS = {'H200': 989e12, 'H100': 989e12, 'A100': 312e12, 'L4': 121e12,
              'TPU v5 lite': 197e12, 'TPU v4': 275e12}


def peak_flops():
  """The accelerator's bf16 peak, or None (CPU, or an unknown device: no MFU)."""
  device = jax.devices()[0]
  if device.platform == 'cpu':
    return None
  return next((v for k, v in PEAK_FLOPS.items() if k in device.device_kind), None)


def synthetic_batch(batch, image_size=224, seed=0):
  rng = np.random.RandomState(seed)
  return (rng.randn(batch, image_size, image_size, 3).astype(np.float32),
          rng.randint(0, NUM_CLASSES, batch))


def jax_step(tuning, batch, dtype='float32', remat='none'):
  """(step(), FLOPs per step): `step()` runs one train step of ours and waits for it."""
  model = models.preset('vit_b16', num_classes=NUM_CLASSES, tuning=tuning, dtype=dtype,
                        remat=remat)
  config = recipes.base(model, 'synthetic')
  config.batch_size = batch
  config.num_train_steps = 10_000
  config.warmup_steps = 0
  trainer = train.Trainer(train.Run(config))
  images, labels = synthetic_batch(batch)
  data = {'image': jnp.asarray(images), 'label': jnp.asarray(labels)}
  state = trainer.initial_state()
  compiled = trainer.jit_train_step().lower(state, data).compile()

  def step():
    nonlocal state
    state, metrics = compiled(state, data)
    jax.block_until_ready(metrics['loss'])

  return step, compiled.cost_analysis()['flops']


def torch_step(batch, dtype='float32', compile_model=False):
  """`step()` for the PyTorch AdaptFormer ViT-B/16 (same config as ours)."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  width, depth, heads, mlp_dim, patch = 768, 12, 12, 3072, 16

  class Adapter(nn.Module):
    """The official AdaptFormer adapter: up(dropout(relu(down(x)))) * scale."""

    def __init__(self):
      super().__init__()
      self.down_proj = nn.Linear(width, 64)
      self.up_proj = nn.Linear(64, width)
      nn.init.zeros_(self.up_proj.weight)
      nn.init.zeros_(self.up_proj.bias)

    def forward(self, x):
      h = F.dropout(F.relu(self.down_proj(x)), 0.1, self.training)
      return self.up_proj(h) * 0.1

  class Block(nn.Module):

    def __init__(self):
      super().__init__()
      self.norm1 = nn.LayerNorm(width, eps=1e-6)
      self.qkv = nn.Linear(width, 3 * width)
      self.proj = nn.Linear(width, width)
      self.norm2 = nn.LayerNorm(width, eps=1e-6)
      self.fc1 = nn.Linear(width, mlp_dim)
      self.fc2 = nn.Linear(mlp_dim, width)
      self.adaptmlp = Adapter()

    def forward(self, x):
      b, n, _ = x.shape
      q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
      attn = F.scaled_dot_product_attention(q, k, v)
      x = x + self.proj(attn.transpose(1, 2).reshape(b, n, width))
      return x + self.fc2(F.gelu(self.fc1(self.norm2(x)))) + self.adaptmlp(x)

  class ViT(nn.Module):

    def __init__(self):
      super().__init__()
      self.patch_embed = nn.Conv2d(3, width, patch, patch)
      self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
      self.pos_embed = nn.Parameter(torch.zeros(1, (224 // patch) ** 2 + 1, width))
      self.blocks = nn.Sequential(*[Block() for _ in range(depth)])
      self.norm = nn.LayerNorm(width, eps=1e-6)
      self.head = nn.Linear(width, NUM_CLASSES)

    def forward(self, images):
      x = self.patch_embed(images).flatten(2).transpose(1, 2)
      x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
      return self.head(self.norm(self.blocks(x))[:, 0])

  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  # JAX's default f32 matmul precision on GPUs is TF32; let PyTorch use it too.
  torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
  model = ViT().to(device).train()
  for name, p in model.named_parameters():
    p.requires_grad = 'adaptmlp' in name or name.startswith('head')
  trainable = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.SGD(trainable, lr=0.01, momentum=0.9)
  forward = torch.compile(model) if compile_model else model
  images, labels = synthetic_batch(batch)
  images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device)
  labels = torch.from_numpy(labels).to(device)
  autocast = torch.autocast(device, torch.bfloat16, enabled=dtype == 'bfloat16')

  def step():
    opt.zero_grad(set_to_none=True)
    with autocast:
      loss = F.cross_entropy(forward(images), labels)
    loss.backward()
    opt.step()
    if device == 'cuda':
      torch.cuda.synchronize()

  return step


def per_step_seconds(step, target_seconds=0.5):
  """A timer of one sample: seconds per step over enough steps to last ~`target_seconds`."""
  start = time.perf_counter()
  step()
  n = max(1, math.ceil(target_seconds / (time.perf_counter() - start)))

  def sample():
    start = time.perf_counter()
    for _ in range(n):
      step()
    return (time.perf_counter() - start) / n

  return sample


def interleaved_medians(steps, repeats):
  """Median seconds per step of each of `steps` (name -> step), timed in alternation.

  Prints the host's load average before and after: on a shared machine other
  processes slow the frameworks unequally (PyTorch's OpenMP barriers suffer most).
  """
  for step in steps.values():  # compile / warm up
    step()
  samplers = {name: per_step_seconds(step) for name, step in steps.items()}
  times = {name: [] for name in steps}
  load = os.getloadavg()[0]
  for _ in range(repeats):
    for name, sample in samplers.items():
      times[name].append(sample())
  print(f'load average {load:.1f} -> {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs)')
  return {name: statistics.median(t) for name, t in times.items()}, times


def report(name, seconds, batch, flops=None, samples=None):
  line = f'{name:28s} {seconds * 1e3:9.1f} ms/step  {batch / seconds:7.1f} img/s'
  peak = peak_flops()
  if flops and peak:
    line += f'  MFU {flops / seconds / peak:6.1%}'
  if samples:
    line += f'  (samples {min(samples) * 1e3:.0f}-{max(samples) * 1e3:.0f} ms)'
  print(line, flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--repeats', type=int, default=7)
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  parser.add_argument('--no_compile', action='store_true', help='skip torch.compile')
  args = parser.parse_args()
  import torch  # pylint: disable=g-import-not-at-top
  print(f'ViT-B/16 AdaptFormer train step, batch {args.batch}, 224 px, {args.dtype}; '
        f'jax {jax.__version__} on {jax.devices()[0].device_kind}, torch {torch.__version__} '
        f'({torch.get_num_threads()} threads)', flush=True)
  ours, flops = jax_step('adaptformer', args.batch, args.dtype)
  steps = {'adaptformer_jax': ours, 'torch eager': torch_step(args.batch, args.dtype)}
  if not args.no_compile:
    start = time.perf_counter()
    compiled = torch_step(args.batch, args.dtype, compile_model=True)
    compiled()
    print(f'torch.compile: first step {time.perf_counter() - start:.0f} s', flush=True)
    steps['torch compiled'] = compiled
  medians, samples = interleaved_medians(steps, args.repeats)
  for name, seconds in medians.items():
    report(name, seconds, args.batch, flops, samples[name])
  torch_best = min(v for k, v in medians.items() if k.startswith('torch'))
  print(f'XLA cost analysis: {flops / 1e9:.0f} GFLOP per step')
  print(f'ratio: {medians["adaptformer_jax"] / torch_best:.2f}')


if __name__ == '__main__':
  main()
