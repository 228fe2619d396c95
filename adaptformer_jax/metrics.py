"""Metrics to TensorBoard and metrics.jsonl, the console progress bar, the confusion matrix PNG."""
import json
import os
import sys
import time
from collections.abc import Sequence

import jax
import numpy as np
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


def write_confusion_png(path: str, confusion: np.ndarray, class_names: Sequence[str]) -> None:
  """A confusion-matrix heat map: row i is the true class, column j the prediction,
  shaded by the share of class i predicted as j; counts and names when they fit.
  """
  from PIL import Image, ImageDraw, ImageFont  # pylint: disable=g-import-not-at-top
  counts = np.asarray(confusion)
  n = len(class_names)
  rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
  cell = int(np.clip(1200 // n, 3, 40))
  font = ImageFont.load_default(size=12)
  labels = cell >= 14
  names = [f'{i} {name}' for i, name in enumerate(class_names)]
  left = int(max(font.getlength(s) for s in names)) + 10 if labels else 4
  top = 40 if labels else 4
  title = 'rows: true class, columns: predicted' if labels else ''
  width = max(left + n * cell + 4, int(font.getlength(title)) + 8)
  image = Image.new('RGB', (width, top + n * cell + 4), 'white')
  draw = ImageDraw.Draw(image)
  for i in range(n):
    for j in range(n):
      shade = int(255 * (1 - rates[i, j]))
      box = (left + j * cell, top + i * cell, left + (j + 1) * cell - 1, top + (i + 1) * cell - 1)
      draw.rectangle(box, fill=(shade, shade, 255))
      if cell >= 28 and counts[i, j]:
        draw.text((box[0] + cell / 2, box[1] + cell / 2), str(counts[i, j]), anchor='mm',
                  font=font, fill='white' if shade < 128 else 'black')
    if labels:
      draw.text((left - 6, top + i * cell + cell / 2), names[i], anchor='rm', font=font,
                fill='black')
      draw.text((left + i * cell + cell / 2, top - 4), str(i), anchor='mb', font=font,
                fill='black')
  draw.text((4, 4), title, font=font, fill='black')
  image.save(path)
