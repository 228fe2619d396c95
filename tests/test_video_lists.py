"""Official `<path> <label>` video lists decoded with PyAV: sampling, bad lists, bad videos."""
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
import pytest

from adaptformer_jax import data
from adaptformer_jax.data import video_lists
from adaptformer_jax.errors import UserError

av = pytest.importorskip('av')
SHARDING = NamedSharding(jax.sharding.Mesh(np.array(jax.devices()[:1]), ('data',)), P('data'))


def write_video(path, values, size=(24, 32)):
  """An mpeg4 video whose frame i is flat grey `values[i]`."""
  with av.open(str(path), 'w') as container:
    stream = container.add_stream('mpeg4', rate=25)
    stream.height, stream.width = size
    stream.pix_fmt = 'yuv420p'
    for v in values:
      frame = np.full((*size, 3), v, np.uint8)
      for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format='rgb24')):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


def _cfg(root, train_list, eval_list=None, **overrides):
  cfg = dict(name='video_list', data_dir=None, video_root=str(root), num_classes=3,
             train_split=str(train_list), eval_split=str(eval_list or train_list),
             train_pp='resize', eval_pp='resize', normalize='none', shuffle_buffer=16,
             frame_sampling='dense', frame_stride=1)
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


@pytest.fixture(name='videos')
def _videos(tmp_path):
  write_video(tmp_path / 'a.mp4', [0, 40, 80, 120, 160, 200])  # 6 frames
  write_video(tmp_path / 'b.mp4', [200, 100])                   # 2 frames: too short
  (tmp_path / 'broken.mp4').write_bytes(b'not a video at all')
  return tmp_path


def _eval(cfg, batch=4):
  batches = list(data.eval_iterator(cfg, image_size=8, global_batch=batch,
                                    sharding=SHARDING, num_frames=4))
  return [{k: np.asarray(v) for k, v in b.items()} for b in batches]


def test_clips_sample_the_middle_and_repeat_a_short_videos_last_frame(videos):
  (videos / 'val.csv').write_text('a.mp4 2\nb.mp4 1\n')
  cfg = _cfg(videos, videos / 'val.csv')
  info = data.info(cfg)
  assert (info.num_train, info.num_eval, info.num_classes) == (2, 2, 3)
  (batch,) = _eval(cfg)
  assert batch['image'].shape == (4, 4, 8, 8, 3)
  greys = np.round(batch['image'][:2].mean((2, 3, 4)) * 255)
  np.testing.assert_allclose(greys[0], [40, 80, 120, 160], atol=4)  # frames 1-4 of 6
  np.testing.assert_allclose(greys[1], [200, 100, 100, 100], atol=4)  # padded by repetition
  np.testing.assert_array_equal(batch['label'][:2], [2, 1])
  np.testing.assert_array_equal(batch['mask'], [1, 1, 0, 0])


def test_unreadable_videos_are_skipped_and_counted(videos, caplog):
  (videos / 'train.csv').write_text('a.mp4 0\nbroken.mp4 1\nb.mp4 2\n')
  cfg = _cfg(videos, videos / 'train.csv')
  (batch,) = _eval(cfg)
  np.testing.assert_array_equal(batch['mask'], [1, 1, 0, 0])  # the broken one is gone
  np.testing.assert_array_equal(batch['label'][:2], [0, 2])
  assert any('Skipping unreadable video' in r.message and 'broken.mp4' in r.message
             for r in caplog.records)
  train = data.train_iterator(cfg, image_size=8, global_batch=2, sharding=SHARDING,
                              seed=0, num_frames=4)
  labels = [int(l) for _ in range(3) for l in np.asarray(next(train)['label'])]
  assert set(labels) == {0, 2}


@pytest.mark.parametrize('lines,message', [
    ('a.mp4 0\nmissing.mp4 1\n', r'1 missing files \(check data\.video_root\): line 2: .*missing\.mp4'),
    ('a.mp4 0\nb.mp4 3\nb.mp4 -1\n',
     r'2 labels outside 0\.\.2 \(data\.num_classes=3\): line 2: label 3; line 3: label -1'),
    ('a.mp4 zero\n', r"1 not '<path> <label>' with an integer label: line 1: 'a\.mp4 zero'"),
])
def test_bad_lists_fail_at_once_naming_the_lines(videos, lines, message):
  (videos / 'bad.csv').write_text(lines)
  with pytest.raises(UserError, match=r'data\.train_split: .*bad\.csv has ' + message) as e:
    data.info(_cfg(videos, videos / 'bad.csv'))
  assert '\n' not in str(e.value)


def test_a_missing_list_or_class_count_is_a_clear_error(videos):
  with pytest.raises(UserError, match=r"video list '.*nope\.csv' does not exist"):
    data.info(_cfg(videos, videos / 'nope.csv'))
  (videos / 'ok.csv').write_text('a.mp4 0\n')
  with pytest.raises(UserError, match=r"data\.num_classes: set it for data\.name='video_list'"):
    data.info(_cfg(videos, videos / 'ok.csv', num_classes=0))


def test_list_lines_may_use_commas_and_absolute_paths(videos):
  (videos / 'abs.csv').write_text(f'{videos / "a.mp4"},1\n')
  entries = video_lists.read(str(videos / 'abs.csv'), root='', num_classes=3, field='f')
  assert entries == video_lists.VideoList((str(videos / 'a.mp4'),), (1,))
