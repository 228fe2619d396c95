"""evaluate: masked top-1/top-5/loss over padded batches; every real example counts once."""
import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import optax

from adaptformer_jax import evaluate


class Logits(nn.Module):
  """The 'images' are the logits: lets a test choose every prediction."""

  @nn.compact
  def __call__(self, x, train=False):
    return x


def test_padding_is_masked_out_of_every_metric():
  rng = np.random.RandomState(0)
  logits = rng.standard_normal((12, 7)).astype(np.float32)
  labels = rng.randint(0, 7, 12).astype(np.int32)
  mask = np.array([1.0] * 10 + [0.0] * 2, np.float32)  # the last batch is padded
  logits[10:] = 0.0
  logits[10:, labels[10:]] = 100.0  # padded rows would be right (and add no loss)
  batches = [{'image': logits[i:i + 4], 'label': labels[i:i + 4], 'mask': mask[i:i + 4]}
             for i in range(0, 12, 4)]
  result = evaluate.evaluate(Logits(), {}, batches)

  real_logits, real_labels = logits[:10], labels[:10]
  top5 = np.argsort(-real_logits, axis=1)[:, :5]
  loss = optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(real_logits), real_labels)
  assert result['count'] == 10
  np.testing.assert_allclose(result['top1'], np.mean(real_logits.argmax(1) == real_labels))
  np.testing.assert_allclose(result['top5'], np.mean((top5 == real_labels[:, None]).any(1)))
  np.testing.assert_allclose(result['loss'], float(loss.mean()), rtol=1e-6)


def test_top5_with_fewer_than_five_classes_is_always_a_hit():
  batch = {'image': np.eye(3, dtype=np.float32), 'label': np.array([2, 0, 1], np.int32),
           'mask': np.ones(3, np.float32)}
  result = evaluate.evaluate(Logits(), {}, [batch])
  assert (result['top1'], result['top5'], result['count']) == (0.0, 1.0, 3)


def test_confusion_matrix_counts_each_real_example_once():
  labels = np.array([0, 1, 2, 2, 1, 0], np.int32)
  predicted = np.array([0, 2, 2, 1, 1, 1])
  logits = np.eye(3, dtype=np.float32)[predicted]
  mask = np.array([1, 1, 1, 1, 1, 0], np.float32)  # the last is padding
  batches = [{'image': logits[i:i + 3], 'label': labels[i:i + 3], 'mask': mask[i:i + 3]}
             for i in (0, 3)]
  result = evaluate.evaluate(Logits(), {}, batches)
  assert result['confusion'] == [[1, 0, 0], [0, 1, 1], [0, 1, 1]]
  assert result['top1'] == 3 / 5
  np.testing.assert_array_equal(evaluate.per_class_accuracy(result['confusion']), [1, 0.5, 0.5])
  assert 'confusion' not in evaluate.scalars(result) and 'top5' in evaluate.scalars(result)
  lines = evaluate.per_class_table(result['confusion'], ['cat', 'dog', 'fox']).splitlines()
  assert [l.split() for l in lines] == [['class', 'top-1', 'images'], ['cat', '1.0000', '1'],
                                        ['dog', '0.5000', '2'], ['fox', '0.5000', '2']]
