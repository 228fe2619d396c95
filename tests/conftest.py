"""Shared test fixtures: tiny models that compile in seconds on a 2-core CPU."""
import importlib.util
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from adaptformer_jax import models  # noqa: E402


# With CI=true, a skipped test fails the run unless its reason holds one of these texts:
# skips that are expected on CI, each with why. CI runs `make test` as root on a machine
# of this project's kind, with the venv of requirements-dev.txt, and no GPU; so a skip
# for a missing package, for not being root or for a tmpfs that cannot be mounted means
# a test silently stopped running there, and fails it.
CI_EXPECTED_SKIPS = {
    # CI machines have no accelerator; a test that needs one says so in these words
    # (none does today: the GPU checks are benchmarks/gpu_check.py, run by hand).
    'needs a GPU': 'no GPU on CI',
}
_skips = []  # (test id, reason) of every skip reported to this process

# The files that take longest on 2 cores (pytest --durations, 2026-12-07), run first: with
# `make test`'s `--dist loadfile --no-loadscope-reorder`, a long file left for last keeps
# one worker busy while the other idles.
SLOWEST_FILES = ('test_benchmarks.py', 'test_reliability.py', 'test_cli.py', 'test_train.py',
                 'test_hostile.py', 'test_demo.py', 'test_notebook.py', 'test_multihost.py')


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(SLOWEST_FILES)))  # stable


def _skip_reason(report):
  longrepr = report.longrepr
  reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
  return reason.removeprefix('Skipped: ')


def _record_skip(report):
  if report.skipped and not hasattr(report, 'wasxfail'):
    _skips.append((report.nodeid, _skip_reason(report)))


def pytest_runtest_logreport(report):
  _record_skip(report)


def pytest_collectreport(report):  # a whole module skipped, e.g. by importorskip
  _record_skip(report)


def unexpected_skips():
  return [(test, reason) for test, reason in dict.fromkeys(_skips)
          if not any(text in reason for text in CI_EXPECTED_SKIPS)]


def _checks_skips(config):
  """On CI, in the process that reports (not a pytest-xdist worker)."""
  return os.environ.get('CI') == 'true' and not hasattr(config, 'workerinput')


def pytest_sessionfinish(session, exitstatus):
  if _checks_skips(session.config) and unexpected_skips() and exitstatus == pytest.ExitCode.OK:
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
  del exitstatus
  if not _checks_skips(config) or not unexpected_skips():
    return
  terminalreporter.write_sep('=', 'CI=true: unexpected skips fail the run', red=True)
  for test, reason in unexpected_skips():
    terminalreporter.write_line(f'UNEXPECTED SKIP {test}: {reason}')
  terminalreporter.write_line('Make the test run on CI, or add its reason to '
                              'CI_EXPECTED_SKIPS in tests/conftest.py with why.')


# Two 32 px images for the model tests (tiny_cfg's image size).
IMAGES = np.random.RandomState(0).standard_normal((2, 32, 32, 3)).astype(np.float32)


def tiny_cfg(**overrides):
  """A width-32, depth-2, 32 px ViT (8 px patches) for tests."""
  base = dict(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=8,
              image_size=32, num_classes=5)
  base.update(overrides)
  adapter = dict(bottleneck=8)
  adapter.update(base.pop('adapter', {}))
  return models.preset('vit_ti16', adapter=adapter, **base)


def tiny_video_cfg(**overrides):
  """A width-32, depth-2 VideoMAE-style model on 4-frame 32 px clips (2x8x8 tubelets)."""
  base = dict(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=8,
              image_size=32, num_frames=4, num_classes=5)
  base.update(overrides)
  adapter = dict(bottleneck=8)
  adapter.update(base.pop('adapter', {}))
  return models.preset('videomae_s16', adapter=adapter, **base)


@pytest.fixture
def ref():
  """tests/references/torch_reference.py, the independent PyTorch port (skips without torch)."""
  pytest.importorskip('torch')
  from references import torch_reference  # pylint: disable=g-import-not-at-top
  return torch_reference


def tiny_run_config(tuning='adaptformer', data_dir=None, **overrides):
  """A full run config for the tiny ViT on the embedded digits (16 px, 10 classes)."""
  from adaptformer_jax import recipes  # pylint: disable=g-import-not-at-top
  model = tiny_cfg(tuning=tuning, patch_size=4, image_size=16, num_classes=10)
  config = recipes.base(model, 'sklearn_digits/all', data_dir=data_dir,
                        train_pp='pad_crop', eval_pp='resize', normalize='none')
  config.batch_size = 32
  config.eval_batch_size = 64
  config.num_train_steps = 40
  config.warmup_steps = 4
  config.log_every_steps = 10
  config.checkpoint_every_steps = 20
  config.optimizer.base_lr = 2.0
  config.progress = False
  config.update(overrides)
  return config


def shipped_config(name, arg=None):
  """`configs/<name>.py`'s get_config(arg), loaded as the CLI loads it (by path)."""
  path = os.path.join(os.path.dirname(__file__), '..', 'configs', f'{name}.py')
  spec = importlib.util.spec_from_file_location(f'configs_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def mock_tfds_metadata(data_dir, name, num_examples, splits=('train', 'test')):
  """dataset_info.json for `tfds.testing.mock_data`, so splits and sizes are the mocked ones."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder(name, data_dir=data_dir)
  template = tfds.core.ShardedFileTemplate(
      data_dir=builder.data_path, template='{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}',
      dataset_name=builder.name, filetype_suffix='tfrecord')
  builder.info.set_splits(tfds.core.SplitDict([
      tfds.core.SplitInfo(name=split, shard_lengths=[num_examples], num_bytes=0,
                          filename_template=template) for split in splits]))
  builder.data_path.mkdir(parents=True)
  builder.info.write_to_directory(builder.data_path)


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """One prepared copy of the embedded dataset for the whole session."""
  return str(tmp_path_factory.mktemp('tfds'))


@pytest.fixture(scope='session')
def video_dir(tmp_path_factory):
  """One offline build of moving_digits/direction for the whole session."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from adaptformer_jax import data  # pylint: disable=g-import-not-at-top
  root = str(tmp_path_factory.mktemp('tfds_video'))
  data.info(ml_collections.ConfigDict(dict(
      name='moving_digits/direction', data_dir=root, train_split='train',
      eval_split='test')))
  return root


COLORS = {'blue': (30, 60, 200), 'green': (40, 180, 60), 'red': (200, 40, 40)}  # class -> mean RGB


def write_image(path, color, size=(16, 16), mode='RGB', seed=0):
  """A real image file, noisy around `color` (RGB); the format follows the suffix."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  w, h = size
  tint = rng.uniform(-20, 20, 3)
  pixels = np.clip(np.add(color, tint) + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
  image = Image.fromarray(pixels)
  if mode == 'RGBA':
    image.putalpha(Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)))
  elif mode != 'RGB':
    image = image.convert(mode)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  image.save(path)
  return path


def make_image_folder(root, per_class=8, mixed=True):
  """root/<class>/... for COLORS; with `mixed`, files of every format, mode and wildly
  different sizes, one corrupt JPEG, one non-image named .png and an ignored notes.txt.

  Returns {path: class} of the readable images.
  """
  kinds = [('.png', 'RGB', (16, 16)), ('.jpg', 'RGB', (24, 16))]
  if mixed:
    kinds += [('.png', 'L', (3, 90)), ('.jpg', 'L', (120, 7)), ('.bmp', 'RGB', (40, 30)),
              ('.gif', 'P', (16, 16)), ('.webp', 'RGB', (33, 17)), ('.png', 'P', (640, 480))]
  images = {}
  for c, (name, color) in enumerate(sorted(COLORS.items())):
    for i in range(per_class):
      suffix, mode, size = kinds[i % len(kinds)]
      if mixed and c == 0 and i == 0:
        suffix, mode = '.png', 'RGBA'
      path = os.path.join(root, name, f'{i:02d}{suffix}')
      images[write_image(path, color, size, mode, seed=100 * c + i)] = name
  if mixed:
    with open(os.path.join(root, 'blue', 'corrupt.jpg'), 'wb') as f:
      with open(next(p for p in images if p.endswith('.jpg')), 'rb') as src:
        f.write(src.read()[:200])  # a truncated JPEG
    with open(os.path.join(root, 'green', 'not_an_image.png'), 'w') as f:
      f.write('this is text\n')
    with open(os.path.join(root, 'red', 'notes.txt'), 'w') as f:
      f.write('ignored: no image extension\n')
  return images


def folder_data_cfg(root, **overrides):
  """The data config of a folder dataset at 16 px, unnormalised."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  cfg = dict(name=f'folder:{root}', data_dir=None, train_split='train', eval_split='val',
             train_pp='resize', eval_pp='resize', normalize='none', shuffle_buffer=50_000,
             val_fraction=0.25, max_unreadable_fraction=0.1)
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


def run_on_host_devices(num_devices, script, *args, timeout=300):
  """Runs `python -c script *args` with `num_devices` fake CPU devices; returns the process.

  A subprocess, because the device count is fixed when JAX starts.
  """
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={num_devices}',
             JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
  return subprocess.run([sys.executable, '-c', script, *args], env=env, capture_output=True,
                        text=True, timeout=timeout, check=False)
