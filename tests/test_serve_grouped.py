"""serve/grouped.py: slot modules applied per group of images equal per-image application,
in every layout; the first layout that fits is chosen. (That the mixed-batch program
runs its slot modules through it: tests/test_serve_model.py.)"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaptformer_jax.serve import grouped

CAPACITY, BATCH = 8, 16
RNG = np.random.default_rng(0)
WEIGHTS = {'w': jnp.asarray(RNG.normal(size=(CAPACITY, 5, 3)), jnp.float32),
           'b': jnp.asarray(RNG.normal(size=(CAPACITY, 3)), jnp.float32)}
X = jnp.asarray(RNG.normal(size=(BATCH, 2, 4, 5)), jnp.float32)  # (B, e=2, tokens, width)


def fn(variables, rows):
  return jax.nn.relu(rows @ variables['w'] + variables['b'])


def per_image(slots):
  return jnp.stack([fn(jax.tree.map(lambda leaf, s=s: leaf[s], WEIGHTS), X[b])
                    for b, s in enumerate(slots)])


def counts_of(slots):
  return np.bincount(slots, minlength=CAPACITY)


# slots -> the layout that must serve them (batch 16 over capacity 8).
CASES = {
    'even over every slot': ([0, 1, 2, 3, 4, 5, 6, 7] * 2, grouped.Layout(8, 2, 'every_slot')),
    'one slot': ([3] * 16, grouped.Layout(1, 16, 'present')),
    'uneven over every slot': ([0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 7, 7, 1, 2, 3, 4],
                               grouped.Layout(8, 4, 'every_slot')),
    'skewed: a group per image': ([6] * 11 + [2] * 5, grouped.Layout(16, 1, 'image')),
}


@pytest.mark.parametrize('name', CASES)
def test_each_layout_equals_per_image_application(name):
  slots, want = CASES[name]
  candidates = grouped.layouts(BATCH, CAPACITY)
  assert candidates[int(grouped.choose(candidates, jnp.asarray(counts_of(slots))))] == want
  slots = jnp.asarray(slots, jnp.int32)
  got = jax.jit(lambda w, x, s: grouped.apply_grouped(fn, w, x, s, CAPACITY))(WEIGHTS, X, slots)
  np.testing.assert_allclose(got, per_image(np.asarray(slots)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('batch,capacity', [(1, 8), (3, 2), (4, 4), (16, 8), (64, 8), (64, 32), (8, 64), (8, 1)])
def test_the_first_layout_that_fits_is_chosen(batch, capacity):
  candidates = grouped.layouts(batch, capacity)
  assert candidates[-1].kind == 'image' or candidates[-1].rows >= batch  # fits every batch
  rng = np.random.default_rng(batch * capacity)
  for trial in range(50):
    present = rng.integers(1, min(batch, capacity) + 1)
    slots = rng.choice(capacity, present, replace=False)[rng.integers(0, present, batch)]
    counts = np.bincount(slots, minlength=capacity)
    fits = [l.kind == 'image' or (counts.max() <= l.rows and
                                  (l.kind == 'every_slot' or (counts > 0).sum() <= l.groups))
            for l in candidates]
    assert int(grouped.choose(candidates, jnp.asarray(counts))) == fits.index(True), trial


def test_split_groups_whole_modules_and_leaves_the_prompts_per_image():
  frozen = {'params/block0/attn/qkv/kernel': 0, 'params/block0/mlp/fc1/kernel': 0}
  stacked = {'params/block0/adapter/down/kernel': 1, 'params/block0/adapter/up/bias': 2,
             'params/block0/attn/lora_q/a': 3, 'params/head/linear/kernel': 4,
             'batch_stats/head/bn/mean': 5, 'params/prompts': 6}
  owned, rest = grouped.split(stacked, frozen)
  assert owned == {'block0/adapter': {'params': {'down': {'kernel': 1}, 'up': {'bias': 2}}},
                   'block0/attn/lora_q': {'params': {'a': 3}},
                   'head': {'params': {'linear': {'kernel': 4}},
                            'batch_stats': {'bn': {'mean': 5}}}}
  assert rest == {'params/prompts': 6}

