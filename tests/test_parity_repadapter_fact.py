"""RepAdapter and FacT (TT, TK): logits against the authors' forward, their checkpoints
(full state dicts and the method + head files their training scripts save) through
`pretrained.load`, and their parameter counts (training: tests/test_train.py).

The reference is tests/references/repadapter_fact_reference.py, an independent port of
the official code on timm's ViT, checked once against the official files.
"""

import jax
import numpy as np
import pytest

from adaptformer_jax import models
from adaptformer_jax import peft
from adaptformer_jax import pretrained
from adaptformer_jax.errors import UserError
from conftest import IMAGES
from conftest import tiny_cfg

TIMM_TINY = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
                 img_size=32, num_classes=5)

# case: (our model.tuning and options; scales other than 1, where a misplaced one shows).
CASES = {
    'repadapter_block': dict(tuning='repadapter', repadapter=dict(scale=0.7)),
    'repadapter_attn_4_groups': dict(tuning='repadapter', repadapter=dict(
        scale=2.0, placement='attn', groups=4, dim=12)),
    'fact_tt': dict(tuning='fact_tt', fact=dict(scale=2.5)),
    'fact_tk': dict(tuning='fact_tk', fact=dict(scale=0.3, rank=4)),
}


@pytest.fixture(name='port', scope='module')
def _port():
  from references import timm_reference  # pylint: disable=g-import-not-at-top
  timm_reference.import_timm()
  from references import repadapter_fact_reference  # pylint: disable=g-import-not-at-top
  return timm_reference, repadapter_fact_reference


def with_method(port, model, options):
  """`model` (timm) with the method of our `options`, as the authors' code adds it."""
  _, ref = port
  if options['tuning'] == 'repadapter':
    r = {**tiny_cfg().repadapter, **options['repadapter']}
    return ref.add_repadapter(model, r['dim'], r['groups'], r['scale'], r['placement'])
  f = {**tiny_cfg().fact, **options['fact']}
  return ref.add_fact(model, options['tuning'][len('fact_'):], f['rank'], f['scale'])


def reference(port, case, seed=0):
  """The authors' model at tiny size, every parameter random and non-zero, eval mode."""
  timm_reference, _ = port
  from timm.models import vision_transformer  # pylint: disable=g-import-not-at-top
  model = with_method(port, vision_transformer.VisionTransformer(**TIMM_TINY), CASES[case])
  return timm_reference.randomize(model, seed)


def nan_variables(cfg):
  """A full variable tree of NaNs: any leaf the load fails to fill poisons the logits."""
  shapes = jax.eval_shape(models.build(cfg).init, jax.random.key(0), IMAGES[:1])
  return jax.tree.map(lambda s: np.full(s.shape, np.nan, s.dtype), shapes)


def logits(cfg, variables):
  return np.asarray(models.build(cfg).apply(variables, IMAGES))


def relative_error(ours, ref):
  return np.max(np.abs(ours - ref)) / np.max(np.abs(ref))


def save(port, state, path):
  port[1].torch.save(state, path)
  return path


@pytest.mark.parametrize('case', CASES)
def test_official_state_dict_gives_the_official_logits(case, port, tmp_path):
  torch_model = reference(port, case, seed=len(case))
  cfg = tiny_cfg(**CASES[case])
  path = save(port, torch_model.state_dict(), tmp_path / 'official.pth')
  variables = pretrained.load(path, cfg, init_variables=nan_variables(cfg))
  expected = port[1].logits(torch_model, IMAGES)
  assert relative_error(logits(cfg, variables), expected) <= 1e-5
  # The method's parameters matter: zeroed (a fresh method's identity), the logits move.
  zeroed = jax.tree_util.tree_map_with_path(
      lambda p, x: np.zeros_like(x) if 'fact' in str(p) or 'repadapter' in str(p) else x,
      variables)
  assert relative_error(logits(cfg, zeroed), expected) > 1e-2


@pytest.mark.parametrize('case', ['repadapter_block', 'fact_tt', 'fact_tk'])
def test_the_method_and_head_file_of_their_training_script_loads_onto_a_backbone(
    case, port, tmp_path):
  """Their `save` keeps the method's and the head's parameters only; the backbone is the
  timm checkpoint it was trained from (config.init_from)."""
  _, ref = port
  torch_model = reference(port, case, seed=3)
  cfg = tiny_cfg(**CASES[case])
  backbone = pretrained.load(save(port, ref.backbone_state_dict(torch_model),
                                  tmp_path / 'backbone.pth'), cfg)
  trained = save(port, ref.trained_state_dict(torch_model, CASES[case]['tuning']),
                 tmp_path / 'trained.pt')
  with pytest.raises(UserError, match='holds no backbone, only adapters and a head'):
    pretrained.load(trained, cfg)
  variables = pretrained.load(trained, cfg, init_variables=backbone)
  assert relative_error(logits(cfg, variables), ref.logits(torch_model, IMAGES)) <= 1e-5


@pytest.mark.parametrize('case,extra,dropped', [
    ('repadapter_block', 'blocks.0.adapter_attn.conv_C.weight', 'blocks.1.adapter_mlp.conv_B.bias'),
    ('fact_tt', 'blocks.0.attn.o_FacTs.weight', 'blocks.1.mlp.fc2_FacTs.weight'),
    ('fact_tk', 'FacTq', 'FacTp'),
])
def test_unknown_or_missing_method_keys_are_named_never_skipped(case, extra, dropped, port,
                                                                tmp_path):
  _, ref = port
  torch_model = reference(port, case)
  cfg = tiny_cfg(**CASES[case])
  backbone = pretrained.load(save(port, ref.backbone_state_dict(torch_model),
                                  tmp_path / 'backbone.pth'), cfg)
  state = ref.trained_state_dict(torch_model, CASES[case]['tuning'])
  unknown = dict(state, **{extra: ref.torch.zeros(3)})
  with pytest.raises(UserError, match=f'unexpected in the checkpoint: .*{extra}'):
    pretrained.load(save(port, unknown, tmp_path / 'unknown.pt'), cfg, init_variables=backbone)
  partial = {k: v for k, v in state.items() if k != dropped}
  missing = {'blocks.1.adapter_mlp.conv_B.bias': 'block1/repadapter_mlp/up/bias',
             'blocks.1.mlp.fc2_FacTs.weight': 'block1/fact/fc2/kernel',
             'FacTp': 'fact/p'}[dropped]
  with pytest.raises(UserError, match=f'missing from the checkpoint: params/{missing}'):
    pretrained.load(save(port, partial, tmp_path / 'partial.pt'), cfg, init_variables=backbone)


@pytest.mark.parametrize('tuning,options,word', [
    ('repadapter', dict(placement='block'), 'adapter'),
    ('repadapter', dict(placement='attn'), 'adapter'),
    ('fact_tt', {}, 'FacT'),
    ('fact_tk', {}, 'FacT'),
])
def test_vit_b16_trains_as_many_parameters_as_the_authors_model(tuning, options, word, port):
  """ViT-B/16, a 100-class head, the official defaults: our trainable count is the
  authors' (their training scripts train the names holding `word`, and the head)."""
  _, ref = port
  import torch  # pylint: disable=g-import-not-at-top
  from timm.models import vision_transformer  # pylint: disable=g-import-not-at-top
  section = 'repadapter' if tuning == 'repadapter' else 'fact'
  cfg = models.preset('vit_b16', num_classes=100, head='linear', tuning=tuning,
                      **({section: options} if options else {}))
  with torch.device('meta'):  # shapes only
    theirs = with_method(port, vision_transformer.VisionTransformer(num_classes=100),
                         {'tuning': tuning, section: options})
  expected = sum(p.numel() for n, p in theirs.named_parameters() if word in n or 'head' in n)
  params = jax.eval_shape(models.build(cfg).init, jax.random.key(0),
                          np.zeros((1, 224, 224, 3), np.float32))['params']
  assert peft.count(params, peft.trainable_mask(params, cfg)) == expected
  del ref
