"""Every shipped config loads, builds its model and takes one train step on mock data.

The step keeps the config's data pipeline, head, tuning method and optimizer and
shrinks only the model and the batch; tfds datasets are mocked
(`tfds.testing.mock_data`), the embedded ones are built offline, and
`configs/folder.py` gets a small folder of images.
"""
import contextlib
import pathlib

from absl import flags
import jax
from ml_collections import config_flags
import numpy as np
import pytest
import tensorflow_datasets as tfds

from adaptformer_jax import data
from adaptformer_jax import runtime
from adaptformer_jax import schema
from adaptformer_jax import sharding
from adaptformer_jax import train
from adaptformer_jax.data import folder
from adaptformer_jax.data import moving_digits
from adaptformer_jax.data import sources
from adaptformer_jax.data import vtab
from adaptformer_jax.errors import ConfigError
from adaptformer_jax.models import presets
from adaptformer_jax.models import tuning
from conftest import make_image_folder
from conftest import mock_tfds_metadata
from conftest import shipped_config
import vtab_mock

CONFIGS = sorted(p.stem for p in (pathlib.Path(__file__).parent.parent / 'configs').glob('*.py'))
EMBEDDED = (data.embedded.NAME, data.glyphs.NAME, moving_digits.NAME)
OFFICIAL = ('cifar10', 'cifar100', 'food101', 'svhn')
TINY_MODEL = dict(width=32, depth=1, num_heads=2, mlp_dim=64, patch_size=4, image_size=16)


def test_the_shipped_configs_are_all_here():
  assert set(OFFICIAL) | {'demo', 'cifar10_notebook'} <= set(CONFIGS)


@pytest.mark.parametrize('name', CONFIGS)
def test_config_builds_its_model(name):
  config = shipped_config(name, 'adaptformer')
  if config.model.num_classes == 0:  # configs/folder.py: from the data
    config.model.num_classes = 3
  schema.validate(config)
  run = runtime.Run(config)  # checks every trainable rule
  trainable, total = run.param_counts()
  assert 0 < trainable <= total


@pytest.mark.parametrize('name', OFFICIAL)
def test_official_configs_state_the_papers_recipe(name):
  """ViT-B/16, BN + linear head, 224 px, batch 1024, 100 epochs (20 warmup), SGD 0.1 x B/256."""
  for method in tuning.METHODS:
    config = shipped_config(name, method)
    model = config.model
    assert (model.name, model.head, model.image_size, model.tuning) == (
        'vit_b16', 'bn_linear', 224, method)
    assert (model.adapter.bottleneck, model.adapter.scale) == (64, 0.1)
    assert (config.batch_size, config.num_epochs, config.warmup_epochs) == (1024, 100, 20)
    opt = config.optimizer
    assert (opt.name, opt.momentum, opt.weight_decay) == ('sgd', 0.9, 0.0)
    # Full fine-tuning needs a far lower rate than the adapters (it diverges at theirs).
    assert opt.base_lr == (0.001 if method == 'full' else 0.1)


@pytest.mark.parametrize('name', OFFICIAL + ('folder',))
def test_image_recipes_take_a_backbone_preset(name):
  """`configs/NAME.py:METHOD,PRESET` (README, other backbone families), own images too."""
  model = shipped_config(name, 'lora,vit_b14_dinov2').model
  assert (model.name, model.patch_size, model.layerscale, model.tuning) == (
      'vit_b14_dinov2', 14, 1e-5, 'lora')


def _parsed(*argv):
  """The config of `--config ... --config.*` overrides, parsed as the CLI parses them."""
  argv = ['main', *argv]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', flag_values=flag_values, sys_argv=argv)
  flag_values(argv)
  return flag_values.config


@pytest.mark.parametrize('value, expected', [('learnable', 'learnable'), ('0.5', 0.5),
                                             ('2', 2), ('learn', 'learn')])
def test_adapter_scale_is_a_number_or_learnable_from_the_command_line(value, expected):
  config = _parsed(f"--config={pathlib.Path(__file__).parent.parent / 'configs/cifar100.py'}"
                   ':adaptformer', f'--config.model.adapter.scale={value}')
  assert config.model.adapter.scale == expected
  if expected == 'learn':
    with pytest.raises(ConfigError, match="model.adapter.scale: must be a number or "
                       "'learnable', got 'learn'"):
      schema.validate_model(config.model)
  else:
    schema.validate_model(config.model)
    schema.validate(config.to_dict())


def _tiny(config, data_dir):
  """`config` with a tiny model and batch, on `data_dir`; data, head, method and optimizer kept."""
  config.model.update(TINY_MODEL)
  config.model.adapter.bottleneck = 8
  config.init_from = ''  # the recipe is under test here, not the weights
  config.batch_size = config.eval_batch_size = 8
  config.accum_steps = 1
  config.data.data_dir = data_dir
  if config.data.name == data.glyphs.NAME:  # the backbone corpus: its small test build
    config.data.name = f'{data.glyphs.NAME}/small'
  return config


def _video_list(config, root):
  """Two tiny videos and a `<path> <label>` list in `root`, as both splits of `config`."""
  from test_video_lists import write_video  # pylint: disable=g-import-not-at-top
  for i in range(2):
    write_video(f'{root}/{i}.mp4', [40 * i, 80, 120, 160])
  with open(f'{root}/list.csv', 'w') as f:
    f.write('0.mp4 0\n1.mp4 1\n')
  config.data.update(dict(video_root=str(root), train_split=f'{root}/list.csv',
                          eval_split=f'{root}/list.csv'))


@pytest.mark.parametrize('name', CONFIGS)
def test_config_takes_one_train_step(name, tmp_path, data_dir):
  config = shipped_config(name, 'adaptformer')
  embedded = config.data.name.split('/')[0] in EMBEDDED
  config = _tiny(config, data_dir if embedded else str(tmp_path))
  video_list = config.data.name == sources.VIDEO_LIST
  if video_list:
    _video_list(config, tmp_path)
  elif folder.is_folder(config.data.name):
    make_image_folder(str(tmp_path / 'images'), per_class=4, mixed=False)
    config.data.name = f'folder:{tmp_path}/images'
    embedded = True  # nothing to mock
  elif vtab.is_vtab(config.data.name):  # the official split sizes, so the slices are valid
    vtab_mock.prepare(str(tmp_path), [vtab.task(config.data.name)])
  elif not embedded:
    mock_tfds_metadata(str(tmp_path), config.data.name, 16,
                       splits=(config.data.train_split, config.data.eval_split))
  with contextlib.nullcontext() if embedded or video_list else tfds.testing.mock_data(
      num_examples=16, data_dir=str(tmp_path)):
    info = data.info(config.data)
    config = runtime.with_num_classes(config, info.num_classes, 'the data has other classes')
    trainer = train.Trainer(runtime.Run(config), info.num_train)
    batch = next(data.train_iterator(
        config.data, image_size=config.model.image_size, global_batch=config.batch_size,
        sharding=sharding.batch_sharding(trainer.run.mesh), seed=0,
        num_frames=config.model.num_frames if config.model.patch_embed == 'tubelet' else None))
  state, metrics = trainer.jit_train_step()(trainer.initial_state(), batch)
  assert int(state.step) == 1
  assert bool(metrics['finite']) and np.isfinite(float(metrics['loss']))
  assert jax.tree.structure(state.params) == jax.tree.structure(
      trainer.run.abstract_variables['params'])

