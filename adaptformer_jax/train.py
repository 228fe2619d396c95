"""train_and_evaluate(config, workdir): the fine-tuning loop and the pieces it is built from.

One jitted step over a data-parallel mesh maps (state, batch) -> (state, metrics);
frozen parameters are constants to autodiff and carry no optimizer state.
"""
import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from adaptformer_jax import class_names
from adaptformer_jax import data
from adaptformer_jax import evaluate
from adaptformer_jax import interrupts
from adaptformer_jax import metrics
from adaptformer_jax import models
from adaptformer_jax import runtime
from adaptformer_jax import schema
from adaptformer_jax import sharding
from adaptformer_jax import workdirs
from adaptformer_jax.errors import UserError
from adaptformer_jax.models import tuning
from adaptformer_jax.weights import checkpoints
from adaptformer_jax.weights import formats

class TrainingDiverged(UserError):
  """A non-finite loss or gradient with config.nonfinite == 'stop'."""


@dataclasses.dataclass(frozen=True)
class Plan:
  """Step counts and the peak learning rate, from the config and the dataset size."""
  micro_batch: int
  accum_steps: int
  total_updates: int
  warmup_updates: int
  learning_rate: float

  @property
  def total_steps(self) -> int:
    return self.total_updates * self.accum_steps


def make_plan(config: ml_collections.ConfigDict, num_train: int | None = None) -> Plan:
  """The step plan; `num_train` (training images) is needed only for schedules in epochs."""
  if num_train is None and (config.num_train_steps <= 0 or config.warmup_steps < 0):
    raise UserError('config.num_train_steps and config.warmup_steps must be set when the '
                    'dataset size is unknown (epochs need it).')
  if config.batch_size % config.accum_steps:
    raise UserError(f'config.batch_size={config.batch_size} is not divisible by '
                    f'config.accum_steps={config.accum_steps}.')
  micro = config.batch_size // config.accum_steps
  sharding.check_batch_divisible(micro, 'config.batch_size / config.accum_steps')
  # Checked here, not at the first eval: a bad eval batch must not waste a training run.
  sharding.check_batch_divisible(config.eval_batch_size, 'config.eval_batch_size')
  per_epoch = max(1, (num_train or 0) // config.batch_size)  # updates
  total = max(1, config.num_train_steps if config.num_train_steps > 0
              else config.num_epochs * per_epoch)
  # Warmup is capped so that the cosine part keeps at least one step (optax requires it).
  warmup = config.warmup_steps if config.warmup_steps >= 0 else config.warmup_epochs * per_epoch
  return Plan(micro, config.accum_steps, total, min(warmup, total - 1),
              config.optimizer.base_lr * config.batch_size / 256)


def make_optimizer(config: ml_collections.ConfigDict, plan: Plan,
                   mask: Any) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """SGD (momentum, decoupled-from-nothing weight decay as torch) on a warmup-cosine schedule."""
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, plan.learning_rate, plan.warmup_updates, max(plan.total_updates, 1), 0.0)
  opt = config.optimizer
  if opt.name == 'sgd':  # the AdaptFormer recipe
    tx = optax.chain(optax.add_decayed_weights(opt.weight_decay),
                     optax.sgd(schedule, momentum=opt.momentum or None))
  elif opt.name == 'adamw':  # pre-training from scratch (configs/backbone.py)
    tx = optax.adamw(schedule, weight_decay=opt.weight_decay)
  else:
    raise UserError(f"config.optimizer.name: {opt.name!r} is not supported; use 'sgd' "
                    "or 'adamw'.")
  if plan.accum_steps > 1:
    tx = optax.MultiSteps(tx, plan.accum_steps,
                          should_skip_update_fn=optax.skip_not_finite).gradient_transformation()
  else:
    tx = optax.apply_if_finite(tx, max_consecutive_errors=2**31 - 1)
  return tuning.freeze(tx, mask), schedule


def train_step(state: runtime.TrainState, batch: dict[str, jax.Array], *, model: nn.Module,
               tx: optax.GradientTransformation, mask: Any, seed: int,
               label_smoothing: float) -> tuple[runtime.TrainState, dict[str, jax.Array]]:
  """One micro-batch: forward, input/adapter gradients, (accumulated) SGD update.

  A classifier's loss is the (label-smoothed) cross-entropy; a pre-training model
  (models.mae) returns each image's loss itself.
  """
  rng = jax.random.fold_in(jax.random.key(seed), state.step)
  pretraining = models.is_pretraining(model)

  def loss_fn(params):
    variables = {'params': tuning.stop_frozen_gradients(params, mask)}
    if state.batch_stats:
      variables['batch_stats'] = state.batch_stats
    outputs, new_vars = model.apply(
        variables, batch['image'], train=True, mutable=['batch_stats'],
        rngs={'dropout': rng, 'mask': jax.random.fold_in(rng, 1)})
    new_stats = new_vars.get('batch_stats', state.batch_stats)
    if pretraining:
      return outputs.mean(), ({}, new_stats)
    targets = optax.smooth_labels(
        jax.nn.one_hot(batch['label'], outputs.shape[-1]), label_smoothing)
    loss = optax.softmax_cross_entropy(outputs, targets).mean()
    accuracy = jnp.mean(jnp.argmax(outputs, -1) == batch['label'])
    return loss, ({'accuracy': accuracy}, new_stats)

  (loss, (step_metrics, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  finite = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))
  params = tuning.apply_updates(state.params, updates, mask)
  # A non-finite step leaves parameters, statistics and optimizer state as they were.
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  state = state.replace(step=state.step + 1, params=params,
                        batch_stats=keep(batch_stats, state.batch_stats),
                        opt_state=opt_state)
  return state, {'loss': loss, 'finite': finite, **step_metrics}


class Trainer:
  """A Run with its step plan and optimizer: what training, and restoring a train state, need."""

  def __init__(self, run: runtime.Run, num_train: int | None = None):
    self.run = run
    self.plan = make_plan(run.config, num_train)
    self.tx, self.schedule = make_optimizer(run.config, self.plan, run.mask)

  def initial_state(self) -> runtime.TrainState:
    variables = self.run.initial_variables()
    params = variables['params']
    opt_shardings = sharding.tree_shardings(jax.eval_shape(self.tx.init, params),
                                            self.run.mesh)
    return runtime.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get('batch_stats', {}),
                      opt_state=jax.jit(self.tx.init, out_shardings=opt_shardings)(params))

  def abstract_state(self) -> runtime.TrainState:
    """Shapes and shardings of the state, for restoring without materialising an init."""
    def init():
      variables = self.run.abstract_variables
      return runtime.TrainState(step=jnp.zeros((), jnp.int32), params=variables['params'],
                        batch_stats=variables.get('batch_stats', {}),
                        opt_state=self.tx.init(variables['params']))
    return self.run.on_mesh(jax.eval_shape(init))

  def jit_train_step(self) -> Callable[[runtime.TrainState, dict[str, jax.Array]],
                                        tuple[runtime.TrainState, dict[str, jax.Array]]]:
    config = self.run.config
    step = functools.partial(
        train_step, model=self.run.model, tx=self.tx, mask=self.run.mask, seed=config.seed,
        label_smoothing=config.optimizer.label_smoothing)
    state_shardings = sharding.tree_shardings(self.abstract_state(), self.run.mesh)
    return jax.jit(step, donate_argnums=0,
                   out_shardings=(state_shardings, sharding.replicated(self.run.mesh)))


def setup(config: ml_collections.ConfigDict,
          workdir: str | None = None) -> tuple[Any, Trainer]:
  """The dataset info and the Trainer planned on it; `trainer.run.config` has the class
  count resolved (model.num_classes=0: from the data) or checked against the data.

  A training run starts here, so here the whole config is validated, once, before any of
  it is used; for a run in `workdir` that will start from `init_from` (no checkpoint
  there yet), a missing or unknown file fails now too, not after the data is prepared.
  """
  schema.validate(config)
  if workdir is not None and config.init_from and checkpoints.latest_step(workdir) is None:
    formats.container(config.init_from)
  info = data.info(config.data)
  config = runtime.with_num_classes(
      config, info.num_classes, f'dataset {info.name!r} has {info.num_classes} classes; set '
      f'model.num_classes={info.num_classes} (or 0: from the data)')
  return info, Trainer(runtime.Run(config), info.num_train)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (resuming from the latest checkpoint in workdir), evaluates, returns eval metrics.

  Everything that can be checked without touching the workdir (dataset, model,
  batch split) is, first. The run owns the workdir (workdirs.Lock) until it returns.
  SIGTERM/SIGINT save the current step and raise Interrupted.
  """
  info, trainer = setup(config, workdir)
  config = trainer.run.config
  with workdirs.Lock(workdir):
    workdirs.prepare(config, workdir)
    class_names.record(workdir, info.class_names)
    return _train(config, workdir, trainer, info)


def _train(config: ml_collections.ConfigDict, workdir: str, trainer: Trainer,
           info: Any) -> dict[str, float]:
  """The loop of train_and_evaluate, in a prepared workdir it owns."""
  run, plan = trainer.run, trainer.plan
  ckpt = checkpoints.Checkpointer(workdir, config.keep_checkpoints)
  if ckpt.latest_step() is not None:
    state = ckpt.restore(trainer.abstract_state())
    logging.info('Resumed from step %d in %s.', int(state.step), workdir)
  else:
    state = trainer.initial_state()
  start = int(state.step)
  total = plan.total_steps
  if start > total:
    ckpt.close()
    raise UserError(f'--workdir {workdir} already holds step {start}, past the {total} steps '
                    'this config trains; evaluate it with --mode eval, or train into a new '
                    'workdir.')
  logging.info('Data %s: %d classes (%s), %d training and %d eval images.', config.data.name,
               info.num_classes, _abbreviated(info.class_names), info.num_train, info.num_eval)
  logging.info('Training %s on %s: %d of %d trainable parameters, %d updates of %d images.',
               config.model.tuning, config.data.name, tuning.count(state.params, run.mask),
               tuning.count(state.params), plan.total_updates, config.batch_size)
  train_iter = data.train_iterator(
      config.data, image_size=config.model.image_size, global_batch=plan.micro_batch,
      sharding=sharding.batch_sharding(run.mesh), seed=config.seed, start_step=start,
      num_frames=runtime.num_frames(config.model))
  step_fn = trainer.jit_train_step()
  writer = metrics.MetricWriter(workdir)
  progress = metrics.Progress(total, start, plan.micro_batch, config.progress)
  pending, skipped, eval_metrics, t0 = [], 0, None, time.perf_counter()

  def flush(step):
    """Fetches the pending step metrics: the NaN guard and the logs read them here."""
    nonlocal pending, skipped
    if not pending:
      return
    fetched, pending = jax.device_get(pending), []
    bad = [step - len(fetched) + i + 1 for i, m in enumerate(fetched) if not m['finite']]
    if bad and config.nonfinite == 'stop':
      last = ckpt.latest_step()
      kept = 'no checkpoint was saved' if last is None else \
          f'the last good checkpoint (step {last}) is kept'
      raise TrainingDiverged(
          f'loss or gradient became non-finite at step {bad[0]}; stopped and {kept}. '
          "Lower config.optimizer.base_lr or set config.nonfinite='skip'.")
    skipped += len(bad)
    good = [m for m in fetched if m['finite']] or fetched
    means = {f'train/{k}': sum(float(m[k]) for m in good) / len(good)
             for k in good[0] if k != 'finite'}
    rate = progress.update(step, loss=means['train/loss'])
    writer.write(step, {**means, 'img_per_s': rate,
                        'lr': float(trainer.schedule(step // plan.accum_steps)),
                        'skipped_nonfinite': skipped})

  try:
    with interrupts.stop_requests() as stop:
      for step in range(start, total):
        state, step_metrics = step_fn(state, next(train_iter))
        pending.append(step_metrics)
        done = step + 1
        last = done == total
        if last or done % config.log_every_steps == 0:
          flush(done)
        # Saved before the final evaluation: whatever happens there, the run is kept.
        if last or done % config.checkpoint_every_steps == 0 or stop:
          flush(done)  # the NaN guard runs before a step is saved
          ckpt.save(done, state, class_names.metadata(info.class_names))
        evaluate_now = last or (config.eval_every_steps and
                                done % config.eval_every_steps == 0)
        if evaluate_now:
          flush(done)
          eval_metrics = evaluate.evaluate(run.model, run.variables(state),
                                           runtime.eval_dataset(config, run))
          writer.write(done, {f'eval/{k}': v for k, v in evaluate.scalars(eval_metrics).items()})
        if stop:  # the save completes in ckpt.close() below
          raise interrupts.Interrupted(stop[0], done, workdir)
    if eval_metrics is None:  # resumed after the last step: evaluate what is there
      eval_metrics = evaluate.evaluate(run.model, run.variables(state),
                                       runtime.eval_dataset(config, run))
  finally:
    progress.close()
    writer.close()
    ckpt.close()
  runtime.write_confusion(workdir, eval_metrics, info.class_names)
  elapsed = time.perf_counter() - t0
  logging.info('Done: %s %s (%s, %d steps in %.0fs).', config.data.name,
               evaluate.describe(eval_metrics), config.model.tuning, total - start, elapsed)
  return eval_metrics


def _abbreviated(names: list[str], shown: int = 8) -> str:
  more = f', ... {len(names) - shown} more' if len(names) > shown else ''
  return ', '.join(names[:shown]) + more
