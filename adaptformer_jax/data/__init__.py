"""Input pipelines: tfds datasets (plus the offline `sklearn_digits`, `glyphs`, `moving_digits`),
video lists or image folders to sharded batches.

TensorFlow and tfds are imported on first use of the pipeline, not with this
package: the model, the train step and the benchmarks run where TensorFlow is
absent (e.g. an accelerator image without it).
"""
import importlib

_NAMES = {'DatasetInfo': 'pipeline',
          'eval_iterator': 'pipeline', 'image_batches': 'pipeline', 'info': 'pipeline',
          'train_iterator': 'pipeline',
          'list_images': 'folder'}


def __getattr__(name):
  if name in _NAMES:
    return getattr(importlib.import_module(f'adaptformer_jax.data.{_NAMES[name]}'), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
