"""metrics: metrics.jsonl + TensorBoard rows, the progress bar's throughput, the confusion PNG."""
import os

import numpy as np
from PIL import Image

from adaptformer_jax import metrics


def test_rows_read_back_in_order_and_tensorboard_gets_events(tmp_path):
  writer = metrics.MetricWriter(str(tmp_path))
  writer.write(10, {'train/loss': 2.5, 'lr': 0.1})
  writer.write(20, {'eval/top1': 0.75})
  writer.close()
  assert metrics.read(str(tmp_path)) == [{'step': 10, 'train/loss': 2.5, 'lr': 0.1},
                                         {'step': 20, 'eval/top1': 0.75}]
  assert any(f.startswith('events.out.tfevents')
             for f in os.listdir(tmp_path / 'tensorboard'))


def test_a_resumed_run_appends_to_the_same_file(tmp_path):
  for step in (1, 2):
    writer = metrics.MetricWriter(str(tmp_path))
    writer.write(step, {'train/loss': float(step)})
    writer.close()
  assert [row['step'] for row in metrics.read(str(tmp_path))] == [1, 2]


def test_progress_reports_images_per_second_since_the_last_update(monkeypatch):
  clock = iter([100.0, 102.0, 103.0])
  monkeypatch.setattr(metrics.time, 'perf_counter', lambda: next(clock))
  progress = metrics.Progress(total=10, initial=2, images_per_step=8, enabled=False)
  assert progress.update(6, loss=1.0) == 4 * 8 / 2.0  # 4 steps of 8 images in 2 s
  assert progress.update(7, loss=0.5) == 8 / 1.0
  progress.close()


def test_confusion_png_is_a_readable_image(tmp_path):
  for n in (3, 200):  # names and counts when they fit; a bare heat map otherwise
    path = str(tmp_path / f'{n}.png')
    metrics.write_confusion_png(path, np.eye(n, dtype=int) * 5, [f'class {i}' for i in range(n)])
    with Image.open(path) as image:
      pixels = np.asarray(image.convert('RGB'))
    assert min(pixels.shape[:2]) >= n * 3
    assert (pixels == [0, 0, 255]).all(-1).any()  # the diagonal: 100% of a class, darkest blue
