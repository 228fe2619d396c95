"""The train steps the benchmarks time: ours (the training loop's own jitted step) and PyTorch's.

Ours is `train.Trainer(runtime.Run(config)).jit_train_step()` on synthetic data. PyTorch's is the
same model written as a performance-minded user would: fused qkv,
F.scaled_dot_product_attention, requires_grad=False on the frozen backbone,
momentum SGD on the trainable leaves only, optional torch.compile and bf16 autocast.
Nothing here imports TensorFlow (the accelerator image has none).
"""
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
from adaptformer_jax import runtime  # noqa: E402
from adaptformer_jax import sharding  # noqa: E402
from adaptformer_jax import train  # noqa: E402

NUM_CLASSES = 100


def model_config(preset='vit_b16', tuning='adaptformer', **overrides):
  return models.preset(preset, num_classes=NUM_CLASSES, tuning=tuning, **overrides)


def make_trainer(model_cfg, batch, model_parallel=1):
  """The training loop's Trainer for `model_cfg` at `batch` (the recipe's SGD momentum)."""
  config = recipes.base(model_cfg, 'synthetic')
  config.batch_size = batch
  config.num_train_steps = 10_000
  config.warmup_steps = 0
  config.model_parallel = model_parallel
  return train.Trainer(runtime.Run(config))


def synthetic_batch(batch, image_size=224, seed=0):
  rng = np.random.RandomState(seed)
  return (rng.randn(batch, image_size, image_size, 3).astype(np.float32),
          rng.randint(0, NUM_CLASSES, batch))


def batch_spec(trainer, batch):
  """ShapeDtypeStructs of a batch, sharded as the training loop shards it."""
  size = trainer.run.config.model.image_size
  batch_sharding = sharding.batch_sharding(trainer.run.mesh)
  return {'image': jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32,
                                        sharding=batch_sharding),
          'label': jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=batch_sharding)}


def lower_step(trainer, batch):
  """The jitted train step lowered for abstract state and data (nothing allocated)."""
  return trainer.jit_train_step().lower(trainer.abstract_state(), batch_spec(trainer, batch))


def device_batch(trainer, batch):
  images, labels = synthetic_batch(batch, trainer.run.config.model.image_size)
  return jax.device_put({'image': images, 'label': labels.astype(np.int32)},
                        sharding.batch_sharding(trainer.run.mesh))


def compiled_peak_bytes(compiled):
  """Per-device peak of a compiled step from XLA's buffer assignment (donated state aliased)."""
  m = compiled.memory_analysis()
  return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
          - m.alias_size_in_bytes)


def jax_step(tuning, batch, dtype='float32', remat='none', **overrides):
  """(step(), FLOPs per step): `step()` runs one train step of ours and waits for it."""
  trainer = make_trainer(model_config(tuning=tuning, dtype=dtype, remat=remat, **overrides),
                         batch)
  compiled = lower_step(trainer, batch).compile()
  return step_runner(trainer, compiled), compiled.cost_analysis()['flops']


def step_runner(trainer, compiled, num_steps=1):
  """A function that runs `num_steps` steps of `compiled` (on fresh state and a synthetic
  batch) and waits for them."""
  state, data = trainer.initial_state(), device_batch(trainer, trainer.run.config.batch_size)

  def run():
    nonlocal state
    for _ in range(num_steps):
      state, metrics = compiled(state, data)
    jax.block_until_ready(metrics['loss'])

  return run


def torch_step(model_cfg, batch, device=None, compile_backend=None):
  """`step()` of the PyTorch twin of `model_cfg` (tuning 'adaptformer' or 'full';
  model_cfg.dtype 'bfloat16' = bf16 autocast; on CUDA f32 matmuls use TF32 as JAX does);
  `compile_backend` e.g. 'inductor' wraps the model in torch.compile."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  cfg = model_cfg
  width, heads, patch, size = cfg.width, cfg.num_heads, cfg.patch_size, cfg.image_size
  adapting = cfg.tuning == 'adaptformer'
  if cfg.tuning not in ('adaptformer', 'full'):
    raise ValueError(f'no PyTorch twin for tuning {cfg.tuning!r}')

  class Adapter(nn.Module):
    """The official AdaptFormer adapter: up(dropout(relu(down(x)))) * scale."""

    def __init__(self):
      super().__init__()
      self.down_proj = nn.Linear(width, cfg.adapter.bottleneck)
      self.up_proj = nn.Linear(cfg.adapter.bottleneck, width)
      nn.init.zeros_(self.up_proj.weight)
      nn.init.zeros_(self.up_proj.bias)

    def forward(self, x):
      h = F.dropout(F.relu(self.down_proj(x)), cfg.adapter.dropout, self.training)
      return self.up_proj(h) * cfg.adapter.scale

  class Block(nn.Module):

    def __init__(self):
      super().__init__()
      self.norm1 = nn.LayerNorm(width, eps=1e-6)
      self.qkv = nn.Linear(width, 3 * width)
      self.proj = nn.Linear(width, width)
      self.norm2 = nn.LayerNorm(width, eps=1e-6)
      self.fc1 = nn.Linear(width, cfg.mlp_dim)
      self.fc2 = nn.Linear(cfg.mlp_dim, width)
      self.adaptmlp = Adapter() if adapting else None

    def forward(self, x):
      b, n, _ = x.shape
      q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
      attn = F.scaled_dot_product_attention(q, k, v)
      x = x + self.proj(attn.transpose(1, 2).reshape(b, n, width))
      out = x + self.fc2(F.gelu(self.fc1(self.norm2(x))))
      return out + self.adaptmlp(x) if adapting else out

  class ViT(nn.Module):

    def __init__(self):
      super().__init__()
      self.patch_embed = nn.Conv2d(3, width, patch, patch)
      self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
      self.pos_embed = nn.Parameter(torch.zeros(1, (size // patch) ** 2 + 1, width))
      self.blocks = nn.Sequential(*[Block() for _ in range(cfg.depth)])
      self.norm = nn.LayerNorm(width, eps=1e-6)
      self.head = nn.Linear(width, NUM_CLASSES)

    def forward(self, images):
      x = self.patch_embed(images).flatten(2).transpose(1, 2)
      x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
      return self.head(self.norm(self.blocks(x))[:, 0])

  device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
  # JAX's default f32 matmul precision on GPUs is TF32; let PyTorch use it too.
  torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
  model = ViT().to(device).train()
  for name, p in model.named_parameters():
    p.requires_grad = not adapting or 'adaptmlp' in name or name.startswith('head')
  trainable = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.SGD(trainable, lr=0.01, momentum=0.9)
  forward = torch.compile(model, backend=compile_backend) if compile_backend else model
  images, labels = synthetic_batch(batch, size)
  images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device)
  labels = torch.from_numpy(labels).to(device)
  autocast = torch.autocast(device, torch.bfloat16, enabled=cfg.dtype == 'bfloat16')

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


def report(name, seconds, batch, flops=None, samples=None, peak=None):
  """One timing line; with `peak` (the device's FLOP/s) an MFU column."""
  line = f'{name:28s} {seconds * 1e3:9.1f} ms/step  {batch / seconds:7.1f} img/s'
  if flops and peak:
    line += f'  MFU {flops / seconds / peak:6.1%}'
  if samples:
    line += f'  (samples {min(samples) * 1e3:.0f}-{max(samples) * 1e3:.0f} ms)'
  print(line, flush=True)
