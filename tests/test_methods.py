"""models/methods: the table of tuning methods and the parsed `model.tuning`."""
import re

import flax.traverse_util
import jax
import jax.numpy as jnp
import pytest

from adaptformer_jax import models
from adaptformer_jax.errors import ConfigError
from adaptformer_jax.models import methods
from conftest import tiny_cfg


def test_parse_gives_the_layers_each_combination_builds():
  t = methods.parse(' adaptformer + vpt_deep ')
  assert t.methods == ('adaptformer', 'vpt_deep')
  assert (t.adaptformer, t.lora, t.vpt) == (True, False, 'deep')
  assert methods.parse('lora').vpt is None and methods.parse('vpt_shallow').vpt == 'shallow'


def test_trainable_rules_are_the_union_in_order():
  assert methods.parse('adaptformer+lora').trainable == (
      'head/.*', r'block\d+/adapter/.*', r'block\d+/attn/lora_.*')
  assert methods.parse('full+linear').trainable == ('.*', 'head/.*')


@pytest.mark.parametrize('tuning, message', [
    ('vpt_shallow+vpt_deep', "choose one of 'vpt_shallow' and 'vpt_deep'"),
    ('adaptformer+lorra', "unknown method 'lorra' \\(did you mean 'lora'\\?\\)"),
])
def test_bad_combinations_are_config_errors(tuning, message):
  with pytest.raises(ConfigError, match=message):
    methods.parse(tuning)


def _variable_paths(tuning):
  cfg = tiny_cfg(tuning=tuning, head='bn_linear')
  variables = jax.eval_shape(models.build(cfg).init, jax.random.key(0),
                             jnp.zeros((1, 32, 32, 3)))
  return set(flax.traverse_util.flatten_dict(variables, sep='/'))


def test_fresh_on_load_is_exactly_what_the_methods_add_and_the_head():
  """A backbone checkpoint lacks these leaves; every other leaf must come from it."""
  paths = _variable_paths('adaptformer+vpt_deep+lora')
  added = paths - _variable_paths('full')
  head = {p for p in paths if p.split('/')[1] == 'head'}
  assert added and head
  assert {p for p in paths if methods.FRESH_ON_LOAD.fullmatch(p)} == added | head


def test_every_load_hint_matches_a_parameter_its_method_adds():
  added = _variable_paths('adaptformer+vpt_deep+lora') - _variable_paths('full')
  assert methods.LOAD_HINTS
  for pattern, hint in methods.LOAD_HINTS:
    assert any(re.fullmatch(pattern, p) for p in added), hint
