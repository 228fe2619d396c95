"""Mixed-adapter batches: throughput against one adapter, against per-adapter batches, and memory.

For a set of 8 synthetic exports over one backbone (serve_exports.py), measured side by
side in one process, interleaved, median of `--repeats`:

  (a) 64 images over the 8 adapters in one MultiAdapter batch (8 each, and at random),
      against the same 64 through one adapter: in the same program (slot 0 for all), and
      in that export's own plain model (`--mode predict`'s program): img/s ratios (the
      target: >= 0.9);
  (b) against the 64 grouped into 8 single-adapter batches of 8, each through its export's
      own model (what one process per task, or sequential swaps, would run): the speedup;
  (c) with --memory: the server's resident memory (VmRSS, after /healthz and one request)
      with 1, 8 and 32 adapters, next to the bytes of the backbone and of the adapter slots.

Two sets: 'adaptformer' (8 AdaptFormer exports, bottleneck 16-64, 10-100 classes) and
'mixed' (adaptformer, lora, vpt_deep and linear: the union program computes every
method for every image, prompts included, so it pays for the largest mix).

The last line is `ratio: X`, (a) mixed / own model of the first set.

  python benchmarks/serve_throughput.py [--preset vit_s16 --image_size 64] [--memory]
"""
import argparse
import copy
import io
import os
import signal
import sys
import tempfile
import time

import jax
import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, 'benchmarks')]
import machine  # noqa: E402
import serve_exports  # noqa: E402
import serve_load  # noqa: E402

from adaptformer_jax import jobs  # noqa: E402
from adaptformer_jax import models  # noqa: E402
from adaptformer_jax import predict  # noqa: E402
from adaptformer_jax import recipes  # noqa: E402
from adaptformer_jax.serve import multi  # noqa: E402

SETS = {
    'adaptformer': [('adaptformer', 10 + 12 * i, dict(adapter=dict(bottleneck=16 + 16 * (i % 4))))
                    for i in range(8)],
    'mixed': [('adaptformer', 10, {}), ('adaptformer', 100, dict(adapter=dict(bottleneck=32))),
              ('lora', 20, {}), ('lora', 37, dict(lora=dict(rank=4))),
              ('vpt_deep', 50, dict(vpt=dict(num_tokens=10))), ('vpt_deep', 12, {}),
              ('linear', 64, {}), ('adaptformer+vpt_deep', 25, dict(vpt=dict(num_tokens=4)))],
}


def backbone_config(preset: str, image_size: int):
  """A run config of `preset` at `image_size` (random backbone, seed 0)."""
  model = models.preset(preset, image_size=image_size, num_classes=10)
  config = recipes.base(model, 'sklearn_digits/all', train_pp='resize', eval_pp='resize',
                        normalize='none')
  config.eval_batch_size = 64
  config.progress = False
  return config


def seconds(fn) -> float:
  """Wall seconds of one call of `fn`, to its results."""
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def throughput(config, specs, root: str, repeats: int) -> float:
  """Prints (a) and (b) for one set of exports; returns (a), mixed / own model."""
  dirs = [(f'task{i}', serve_exports.write_export(os.path.join(root, f'task{i}'), config, t, c,
                                                  i, **m)) for i, (t, c, m) in enumerate(specs)]
  served = multi.MultiAdapter(config, dirs)
  rng = np.random.default_rng(0)
  size = config.model.image_size
  images = rng.normal(0, 1, (64, size, size, 3)).astype(np.float32)
  mixed_slots = np.arange(64, dtype=np.int32) % 8
  random_slots = rng.integers(0, 8, 64).astype(np.int32)  # uneven groups, as traffic is
  own = []  # each export's own model: (apply, variables), as --mode predict runs it
  for export in served.exports:
    cfg = copy.deepcopy(config)
    cfg.model = export.model
    run, variables = jobs.load_variables(cfg, adapters=export.path)
    own.append((run.model, variables))
  plain = lambda k, x: predict._probabilities(own[k][0], own[k][1], x)  # pylint: disable=protected-access
  by_adapter = [images[mixed_slots == k] for k in range(8)]
  runs = {
      'mixed, 8 adapters': lambda: served.probabilities(images, mixed_slots),
      'mixed, 8 at random': lambda: served.probabilities(images, random_slots),
      'same program, 1 adapter': lambda: served.probabilities(images, np.zeros(64, np.int32)),
      'own model, 1 adapter': lambda: plain(0, images),
      '8 own models x 8 images': lambda: [plain(k, by_adapter[k]) for k in range(8)],
  }
  for fn in runs.values():
    jax.block_until_ready(fn())  # compile all before timing any
  times = {name: [] for name in runs}
  for _ in range(repeats):  # interleaved: load changes hit every variant alike
    for name, fn in runs.items():
      times[name].append(seconds(fn))
  rate = {name: 64 / float(np.median(t)) for name, t in times.items()}
  for name, r in rate.items():
    print(f'  {name:26s} {r:8.1f} img/s  (median of {repeats}; min {64 / max(times[name]):.1f}, '
          f'max {64 / min(times[name]):.1f})')
  print(f'  (a) mixed / same program one adapter: {rate["mixed, 8 adapters"] / rate["same program, 1 adapter"]:.3f}; '
        f'mixed / own model one adapter: {rate["mixed, 8 adapters"] / rate["own model, 1 adapter"]:.3f}')
  print(f'  (a) at random ({np.bincount(random_slots, minlength=8).tolist()} images per '
        f'adapter) / own model one adapter: '
        f'{rate["mixed, 8 at random"] / rate["own model, 1 adapter"]:.3f}')
  print(f'  (b) mixed vs 8 single-adapter batches: speedup '
        f'{rate["mixed, 8 adapters"] / rate["8 own models x 8 images"]:.2f}x')
  memory = served.memory_bytes()
  print(f'  held: backbone {memory["backbone"] / 2**20:.1f} MiB once, 8 adapter slots '
        f'{memory["adapters"] / 2**20:.2f} MiB; load {os.getloadavg()[0]:.2f}', flush=True)
  return rate['mixed, 8 adapters'] / rate['own model, 1 adapter']


def server_memory(config_path: str, config, root: str) -> None:
  """(c): VmRSS of the server with 1, 8 and 32 AdaptFormer adapters."""
  spec = SETS['adaptformer']
  dirs = {f'task{i}': serve_exports.write_export(os.path.join(root, f'mem{i}'), config,
                                                 *spec[i % 8][:2], i, **spec[i % 8][2])
          for i in range(32)}
  png = io.BytesIO()  # one PNG for the request
  Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(png, 'PNG')
  for count in (1, 8, 32):
    port = serve_load.free_port()
    proc = serve_load.start_server(config_path, dict(list(dirs.items())[:count]), port,
                                   '--max_batch=8', timeout=900)
    try:
      status, _ = serve_load.post(port, 'task0', [('a.png', png.getvalue())])
      assert status == 200
      print(f'  (c) {count:2d} adapters: server RSS {serve_load.rss_mb(proc.pid):7.1f} MB; load '
            f'{os.getloadavg()[0]:.2f}', flush=True)
    finally:
      proc.send_signal(signal.SIGTERM)
      proc.wait(60)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--preset', default='vit_s16')
  parser.add_argument('--image_size', type=int, default=64)
  parser.add_argument('--repeats', type=int, default=7)
  parser.add_argument('--sets', default='adaptformer,mixed')
  parser.add_argument('--memory', action='store_true', help='also (c), starting 3 servers')
  args = parser.parse_args()
  print(machine.describe())
  config = backbone_config(args.preset, args.image_size)
  print(f'{args.preset} at {args.image_size} px, random backbone, float32, batch 64')
  ratios = {}
  with tempfile.TemporaryDirectory() as root:
    for name in filter(None, args.sets.split(',')):
      print(f'set {name!r}: ' + ', '.join(f'{t}({c})' for t, c, _ in SETS[name]))
      ratios[name] = throughput(config, SETS[name], root, args.repeats)
    if args.memory:
      path = os.path.join(root, 'config.py')
      with open(path, 'w') as f:
        f.write(f'import sys\nsys.path.insert(0, {os.path.join(ROOT, "benchmarks")!r})\n'
                'import serve_throughput\n\n\ndef get_config(arg=None):\n'
                f'  return serve_throughput.backbone_config({args.preset!r}, {args.image_size})\n')
      server_memory(path, config, root)
  if ratios:  # the target (a): >= 0.9, for the first set (by default 'adaptformer')
    first = next(iter(ratios))
    print(f'(a) of set {first!r}, mixed / own model one adapter:')
    print(f'ratio: {ratios[first]:.3f}')


if __name__ == '__main__':
  main()
