"""Input pipelines: tfds datasets (plus the offline `sklearn_digits`, `glyphs`, `moving_digits`),
video lists or image folders to sharded batches.

TensorFlow and tfds are imported on first use of the pipeline, not with this
package: the model, the train step and the benchmarks run where TensorFlow is
absent (e.g. an accelerator image without it).
"""
import importlib

_PIPELINE_NAMES = ('check_num_classes', 'DatasetInfo', 'eval_iterator', 'info',
                   'train_iterator')


def __getattr__(name):
  if name in _PIPELINE_NAMES:
    return getattr(importlib.import_module('adaptformer_jax.data.pipeline'), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
