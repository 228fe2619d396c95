"""MultiAdapter: a batch mixing adapters of every kind equals each export's own model, and
the exports that cannot share a frozen backbone or a program are refused, saying why."""
import copy
import os
import sys

import numpy as np
import pytest

from adaptformer_jax import jobs
from adaptformer_jax import predict
from adaptformer_jax.errors import UserError
from adaptformer_jax.serve import grouped
from adaptformer_jax.serve import images
from adaptformer_jax.serve import multi
from conftest import tiny_run_config

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                'benchmarks'))
import serve_exports  # noqa: E402  pylint: disable=g-import-not-at-top

# name: (tuning, classes, model overrides): sizes, scales and heads that differ.
EXPORTS = {
    'af': ('adaptformer', 10, dict(head='bn_linear', adapter=dict(scale=0.5))),
    'lora': ('lora', 4, dict(lora=dict(rank=4, alpha=8.0))),
    'vpt': ('vpt_deep', 7, dict(vpt=dict(num_tokens=3))),
    'combo': ('adaptformer+vpt_deep', 3,
              dict(adapter=dict(bottleneck=4, scale='learnable'), vpt=dict(num_tokens=5))),
    'probe': ('linear', 6, {}),
    'shallow': ('vpt_shallow', 5, dict(vpt=dict(num_tokens=2))),
}
PIXELS = [np.random.default_rng(i).integers(0, 256, (14 + i, 20, 3), np.uint8) for i in range(6)]


@pytest.fixture(scope='module')
def dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp('exports')
  config = tiny_run_config()
  return {name: serve_exports.write_export(str(root / name), config, tuning, classes, seed,
                                           **model)
          for seed, (name, (tuning, classes, model)) in enumerate(EXPORTS.items())}


def own_probabilities(model, name):
  """`--mode predict --adapters DIR`'s probabilities: the export's own model, config and path."""
  export = model.exports[model.slots[name]]
  config = copy.deepcopy(model.config)
  config.model = export.model
  run, variables = jobs.load_variables(config, adapters=export.path)
  return predict.predict(variables, run.config, PIXELS)


def check_mixed_batch(model):
  """Every image through every adapter in one batch equals each export's own model."""
  pp = images.preprocessor(model.config.data, model.config.model.image_size)
  inputs = np.stack([pp(p) for p in PIXELS])
  names = list(model.slots)
  slots = np.array([model.slots[n] for n in names for _ in PIXELS])
  got = model.probabilities(np.concatenate([inputs] * len(names)), slots)
  for i, name in enumerate(names):
    want = own_probabilities(model, name)
    mine = got[i * len(PIXELS):(i + 1) * len(PIXELS)]
    np.testing.assert_allclose(mine[:, :want.shape[1]], want, atol=1e-5, rtol=0, err_msg=name)
    assert (mine[:, want.shape[1]:] == 0).all()  # padded classes get no probability


def test_a_mixed_batch_equals_each_exports_own_model(dirs):
  names = ['af', 'lora', 'vpt', 'combo', 'probe']
  model = multi.MultiAdapter(tiny_run_config(), [(n, dirs[n]) for n in names])
  assert model.model.cfg.tuning == 'adaptformer+lora+vpt_deep'
  check_mixed_batch(model)
  # One more adapter, within the union's shapes and the slot capacity (8): no recompile.
  compiled = multi._probabilities._cache_size()  # pylint: disable=protected-access
  more = multi.MultiAdapter(tiny_run_config(), [(n, dirs[n]) for n in names] + [('af2', dirs['af'])])
  more.probabilities(np.zeros((len(PIXELS) * 5, 16, 16, 3), np.float32),
                      np.zeros(len(PIXELS) * 5, np.int32))
  assert multi._probabilities._cache_size() == compiled  # pylint: disable=protected-access


def test_vpt_shallow_mixes_with_prompt_free_adapters(dirs):
  check_mixed_batch(multi.MultiAdapter(tiny_run_config(),
                                       [(n, dirs[n]) for n in ('shallow', 'lora', 'probe')]))


def test_refuses_what_cannot_share_the_backbone_or_the_program(dirs, tmp_path):
  config = tiny_run_config()
  full = serve_exports.write_export(str(tmp_path / 'full'), config, 'full', 3, 0)
  with pytest.raises(UserError, match=r'full=.* changes the frozen backbone itself '
                     r'\(params/block0/.*tuning .full.\)'):
    multi.MultiAdapter(config, [('af', dirs['af']), ('full', full)])
  other_seed = serve_exports.write_export(str(tmp_path / 'seed'), tiny_run_config(seed=7),
                                          'lora', 3, 0)
  with pytest.raises(UserError, match='randomly initialised backbone from seed 7; pass '
                     '--config.seed=7'):
    multi.MultiAdapter(config, [('other', other_seed)])
  wider = tiny_run_config()
  wider.model.mlp_dim = 96
  with pytest.raises(UserError, match=r'another backbone model \(mlp_dim: export 64 vs config 96'):
    multi.MultiAdapter(wider, [('af', dirs['af'])])
  with pytest.raises(UserError, match=r'VPT-shallow \(shallow\) and VPT-deep \(vpt\)'):
    multi.MultiAdapter(config, [('shallow', dirs['shallow']), ('vpt', dirs['vpt'])])
  ssf = serve_exports.write_export(str(tmp_path / 'ssf'), config, 'ssf', 3, 0)
  with pytest.raises(UserError, match=r"ssf use\(s\) 'ssf', which the server cannot stack.*"
                     '--mode merge'):
    multi.MultiAdapter(config, [('af', dirs['af']), ('ssf', ssf)])
  with pytest.raises(UserError, match='names must differ'):
    multi.MultiAdapter(config, [('a', dirs['af']), ('a', dirs['lora'])])
  with pytest.raises(UserError, match='expected NAME=DIR'):
    multi.parse_adapters([dirs['af']])


def test_the_program_runs_every_slot_module_grouped(dirs, monkeypatch):
  model = multi.MultiAdapter(tiny_run_config(), [(n, dirs[n]) for n in ('af', 'lora')])
  calls = []
  original = grouped.apply_grouped
  monkeypatch.setattr(grouped, 'apply_grouped',
                      lambda fn, v, x, s, c: calls.append(x.shape) or original(fn, v, x, s, c))
  multi._probabilities.clear_cache()  # pylint: disable=protected-access
  model.probabilities(np.zeros((4, *model.image_shape), np.float32), np.array([0, 1, 1, 0]))
  depth = model.config.model.depth
  assert len(calls) == depth + 2 * depth + 1  # adapters, lora_q and lora_v, the head
  assert all(shape[0] == 4 for shape in calls)
