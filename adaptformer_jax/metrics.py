"""Metrics to TensorBoard and metrics.jsonl, and the console progress bar."""
import json
import os
import sys
import time

import jax
import tqdm


def read(workdir: str) -> list[dict[str, float]]:
  """The rows of `<workdir>/metrics.jsonl`, as dicts (step, train/loss, eval/top1, ...)."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


class MetricWriter:
  """Writes scalars to `<workdir>/metrics.jsonl` and TensorBoard event files (process 0 only)."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
    self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({'step': int(step), **scalars}) + '\n')
    self._jsonl.flush()
    for k, v in scalars.items():
      self._tb.add_scalar(k, v, step)
    self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


class Progress:
  """A tqdm bar over optimizer steps showing loss, img/s and the ETA."""

  def __init__(self, total: int, initial: int, images_per_step: int, enabled: bool = True):
    self.images_per_step = images_per_step
    self._bar = tqdm.tqdm(total=total, initial=initial, unit='step', dynamic_ncols=True,
                          mininterval=1.0, file=sys.stderr,
                          disable=not enabled or jax.process_index() != 0)
    self._last_time, self._last_step = time.perf_counter(), initial

  def update(self, step: int, **postfix: float) -> float:
    """Advances to `step`; returns the img/s since the previous call."""
    now = time.perf_counter()
    rate = (step - self._last_step) * self.images_per_step / max(now - self._last_time, 1e-9)
    self._last_time, self._last_step = now, step
    self._bar.update(step - self._bar.n)
    self._bar.set_postfix({**{k: f'{v:.4g}' for k, v in postfix.items()},
                           'img/s': f'{rate:.1f}'}, refresh=False)
    return rate

  def close(self) -> None:
    self._bar.close()
