"""Input pipelines: tfds datasets (plus the offline `sklearn_digits`) to sharded batches."""
from adaptformer_jax.data import embedded  # registers sklearn_digits with tfds
from adaptformer_jax.data.pipeline import check_num_classes
from adaptformer_jax.data.pipeline import DatasetInfo
from adaptformer_jax.data.pipeline import eval_iterator
from adaptformer_jax.data.pipeline import info
from adaptformer_jax.data.pipeline import train_iterator
