"""recipes: the tuning-method argument of a config file and the loop defaults."""
import pytest

from adaptformer_jax import recipes
from adaptformer_jax.errors import ConfigError
from conftest import tiny_cfg


@pytest.mark.parametrize('arg', ['adaptformer', 'lora', 'adaptformer+vpt_deep'])
def test_method_arg_accepts_methods_and_combinations(arg):
  assert recipes.method_arg(arg, 'cifar100') == arg


def test_a_missing_method_names_the_syntax_and_the_methods():
  with pytest.raises(ConfigError, match=r'configs/cifar100\.py:METHOD with METHOD one of '
                                        r'full, linear, adaptformer, .*lora'):
    recipes.method_arg(None, 'cifar100')


def test_an_unknown_method_suggests_the_close_one():
  with pytest.raises(ConfigError, match="did you mean 'vpt_deep'"):
    recipes.method_arg('vpt_dep', 'cifar100')


def test_a_preset_for_a_config_without_one_says_so():
  with pytest.raises(ConfigError, match=r'configs/ucf101\.py:adaptformer,vit_b14_dinov2: this '
                                        r'config takes no backbone preset'):
    recipes.method_arg('adaptformer,vit_b14_dinov2', 'ucf101')
  assert recipes.method_and_backbone('lora,vit_s16', 'cifar100') == ('lora', 'vit_s16')


def test_base_puts_data_overrides_next_to_the_defaults():
  config = recipes.base(tiny_cfg(), 'cifar10', eval_split='validation', normalize='cifar')
  assert (config.data.name, config.data.eval_split, config.data.normalize) == (
      'cifar10', 'validation', 'cifar')
  assert config.data.train_split == 'train' and config.init_from == ''
  assert config.model.width == 32
