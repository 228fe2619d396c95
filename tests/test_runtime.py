"""runtime: the class count from the data, and a trained model read back without its optimizer."""
import jax
import numpy as np
import pytest

from adaptformer_jax import runtime
from adaptformer_jax import schema
from adaptformer_jax import train
from adaptformer_jax.errors import UserError
from adaptformer_jax.weights import checkpoints
from conftest import tiny_run_config


def test_with_num_classes_resolves_zero_and_checks_the_rest():
  config = tiny_run_config()
  config.model.num_classes = 0
  resolved = runtime.with_num_classes(config, 7, 'the data has 7')
  assert resolved.model.num_classes == 7 and config.model.num_classes == 0  # a copy
  assert runtime.with_num_classes(resolved, 7, 'the data has 7') is resolved
  with pytest.raises(UserError, match=r'^model.num_classes=7 but dataset X has 5 classes\.$'):
    runtime.with_num_classes(resolved, 5, 'dataset X has 5 classes')


@pytest.mark.parametrize('head', ['linear', 'bn_linear'])
def test_restore_reads_the_variables_of_a_saved_train_state(tmp_path, head):
  """What eval/export/predict read back equals what training saved, with no optimizer built."""
  config = tiny_run_config()
  config.model.head = head
  schema.validate(config)
  trainer = train.Trainer(runtime.Run(config), num_train=64)
  state = trainer.initial_state()
  params = jax.tree.map(lambda p: p + 1.0, state.params)  # differs from any fresh init
  state = state.replace(step=state.step + 7, params=params)
  with checkpoints.Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(7, state)
  run = runtime.Run(config)
  for variables, source in (run.restore(str(tmp_path)),
                            run.restore(checkpoint_path=str(tmp_path / 'checkpoints' / '7'))):
    assert source == str(tmp_path / 'checkpoints' / '7')
    assert set(variables) == ({'params', 'batch_stats'} if head == 'bn_linear' else {'params'})
    jax.tree.map(np.testing.assert_array_equal, variables, run.variables(state))


def test_training_refuses_a_head_of_another_class_count_than_the_data():
  config = tiny_run_config()
  config.model.num_classes = 5
  with pytest.raises(UserError, match=r"^model.num_classes=5 but dataset 'sklearn_digits/all' "
                     r'has 10 classes; set model.num_classes=10 \(or 0: from the data\)\.$'):
    train.setup(config)
