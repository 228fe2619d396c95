"""Masked-autoencoder pre-training: its loss, its masking, and that its encoder is the ViT."""
import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from adaptformer_jax import models
from adaptformer_jax import pretrained
from adaptformer_jax import train
from adaptformer_jax.errors import ConfigError
from adaptformer_jax.models import mae
from conftest import tiny_cfg
from conftest import tiny_run_config

MAE = dict(mask_ratio=0.75, decoder_width=16, decoder_depth=1, decoder_heads=2)
IMAGES = np.random.RandomState(0).uniform(size=(3, 32, 32, 3)).astype(np.float32)


def mae_cfg(**mae_overrides):
  cfg = tiny_cfg(tuning='full')
  cfg.mae = ml_collections.ConfigDict({**MAE, **mae_overrides})
  return cfg


def _flat_shapes(tree):
  return {k: v.shape for k, v in flax.traverse_util.flatten_dict(tree, sep='/').items()}


def _run(cfg, images, seed=0):
  """(per-image loss, intermediates) of a freshly initialised MaskedAutoencoder."""
  model = models.build(cfg)
  rngs = {'params': jax.random.key(0), 'mask': jax.random.key(seed)}
  variables = model.init(rngs, images)
  return model.apply(variables, images, rngs={'mask': jax.random.key(seed)},
                     capture_intermediates=True, mutable=['intermediates'])


def test_patchify_is_row_major_patches_as_mae():
  # MAE's patchify on NCHW: einsum('nchpwq->nhwpqc'), then (N, h*w, p*p*C).
  p, x = 8, IMAGES
  nchw = x.transpose(0, 3, 1, 2)
  n, c, hh, ww = nchw.shape
  ref = nchw.reshape(n, c, hh // p, p, ww // p, p)
  ref = np.einsum('nchpwq->nhwpqc', ref).reshape(n, (hh // p) * (ww // p), p * p * c)
  np.testing.assert_array_equal(np.asarray(mae.patchify(jnp.asarray(x), p)), ref)


def test_the_encoder_has_the_vits_names_and_shapes():
  cfg = mae_cfg()
  encoder = {k: s for k, s in _flat_shapes(
      jax.eval_shape(models.build(cfg).init, {'params': jax.random.key(0),
                                              'mask': jax.random.key(1)},
                     IMAGES)['params']).items() if not mae.DECODER.match(k)}
  vit = _flat_shapes(jax.eval_shape(models.build(tiny_cfg(tuning='full')).init,
                                    jax.random.key(0), IMAGES)['params'])
  assert encoder == {k: s for k, s in vit.items() if not k.startswith('head/')}


def test_loss_is_the_normalised_pixel_error_of_the_hidden_patches():
  # MAE's forward_loss with norm_pix_loss, from its definition, on NCHW patches.
  loss, state = _run(mae_cfg(), jnp.asarray(IMAGES))
  inter = state['intermediates']
  pred = np.asarray(inter['decoder_pred']['__call__'][0])
  hidden = np.asarray(inter['hidden_mask'][0]).astype(bool)
  nchw = IMAGES.transpose(0, 3, 1, 2).reshape(3, 3, 4, 8, 4, 8).astype(np.float64)
  target = np.einsum('nchpwq->nhwpqc', nchw).reshape(3, 16, 192)
  mean, var = target.mean(-1, keepdims=True), target.var(-1, keepdims=True)
  target = (target - mean) / (var + 1e-6) ** 0.5
  per_patch = ((pred - target) ** 2).mean(-1)
  np.testing.assert_allclose(np.asarray(loss),
                             [per_patch[i][hidden[i]].mean() for i in range(3)], rtol=1e-5)
  # The encoder saw the class token and the 4 kept patches only.
  assert np.asarray(inter['block0']['__call__'][0]).shape[1] == 1 + 4


def test_each_image_hides_its_own_random_patches():
  _, state = _run(mae_cfg(), jnp.asarray(IMAGES))
  hidden = np.asarray(state['intermediates']['hidden_mask'][0])
  assert (hidden.sum(1) == 12).all()  # 75% of 16
  assert len({tuple(h) for h in hidden}) == len(IMAGES)
  _, other = _run(mae_cfg(), jnp.asarray(IMAGES), seed=1)
  assert not np.array_equal(hidden, np.asarray(other['intermediates']['hidden_mask'][0]))


@pytest.mark.parametrize('field, value, message', [
    ('mask_ratio', 1.0, 'mask_ratio'), ('decoder_heads', 3, 'decoder_heads')])
def test_bad_mae_settings_are_refused(field, value, message):
  with pytest.raises(ConfigError, match=message):
    models.build(mae_cfg(**{field: value}))


@pytest.mark.slow
def test_pretraining_trains_exports_the_encoder_and_loads_as_mae(tmp_path, data_dir):
  from adaptformer_jax import jobs  # pylint: disable=g-import-not-at-top
  config = tiny_run_config('full', data_dir=data_dir, num_train_steps=6,
                           checkpoint_every_steps=6)
  config.model.mae = ml_collections.ConfigDict(MAE)
  config.optimizer.name, config.optimizer.base_lr = 'adamw', 1e-3
  result = train.train_and_evaluate(config, str(tmp_path / 'mae'))
  assert set(result) == {'loss', 'count'} and np.isfinite(result['loss'])
  jobs.export(config, str(tmp_path / 'mae'), str(tmp_path / 'export'))
  path = str(tmp_path / 'export' / 'adapter.safetensors')
  # A classifier with MAE's fine-tuning head: mean pool, fresh fc_norm, BN + linear.
  downstream = tiny_run_config('adaptformer').model
  downstream.update(pool='gap', head='bn_linear')
  loaded = flax.traverse_util.flatten_dict(pretrained.load(path, downstream), sep='/')
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  tensors = safetensors.numpy.load_file(path)
  assert not any(mae.DECODER.match(k.split('/', 1)[1]) for k in tensors)
  for key, value in tensors.items():
    if 'norm/' not in key or 'fc_norm' in key:
      np.testing.assert_array_equal(loaded[key], value)
  np.testing.assert_array_equal(loaded['params/fc_norm/scale'], 1.0)  # MAE: fresh fc_norm
