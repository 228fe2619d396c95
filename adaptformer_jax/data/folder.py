"""Folder datasets: `PATH/<class>/<image>` (or `PATH/train|val|test/<class>/...`) as labelled files.

Class names are the sorted class folder names. Every image is decoded once when a
folder is first read, so an unreadable file is dropped (counted, logged; too many
are an error) before the example stream exists: a file failing mid-epoch would
otherwise end training or shift every later example and break exact resume.
"""
import dataclasses
import hashlib
import io
import os
import time

from absl import logging
import numpy as np
import tensorflow as tf

from adaptformer_jax.errors import UserError

PREFIX = 'folder:'
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp')
SPLITS = ('train', 'val')
_SHOWN = 3  # unreadable paths named in a message


@dataclasses.dataclass(frozen=True)
class Folder:
  """The readable images of a folder dataset, by split, with integer labels."""
  root: str
  class_names: tuple
  paths: dict     # split name -> tuple of file paths
  labels: dict    # split name -> tuple of class indices
  unreadable: tuple = ()


def is_folder(name: str) -> bool:
  return str(name).startswith(PREFIX)


def read(name: str, *, val_fraction: float, max_unreadable_fraction: float) -> Folder:
  """Scans `folder:PATH`: classes, the train/val split and the readable images.

  With `PATH/train/` the classes are its folders and `PATH/val/` (else `PATH/test/`),
  when present, is the validation split; otherwise `val_fraction` of each class (at
  least one image of any class with two) is held out, picked by a hash of the file's
  path below PATH: the same files on every run and every host.
  """
  path = str(name)[len(PREFIX):]
  if not path:
    raise UserError("data.name: 'folder:' names no folder; pass "
                    '--config.data.name=folder:PATH with images in PATH/<class>/.')
  root = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(root):
    what = 'is not a directory' if os.path.exists(root) else 'does not exist'
    raise UserError(f'data.name: {name!r}: {root} {what}; pass folder:PATH with images '
                    'in PATH/<class>/.')
  class_root, val_root = _layout(root)
  class_names = _class_folders(class_root)
  files = {'train': _images_by_class(class_root, class_names)}
  if val_root:
    extra = sorted(set(_class_folders(val_root, required=False)) - set(class_names))
    if extra:
      raise UserError(f'{val_root} has class folders that {class_root} lacks: '
                      f"{', '.join(extra)}; both splits need the same classes.")
    files['val'] = _images_by_class(val_root, class_names, required=False)
  every = [p for split in files.values() for paths in split for p in paths]
  unreadable = _unreadable(every)
  if len(unreadable) > max_unreadable_fraction * len(every):
    raise UserError(
        f'{len(unreadable)} of {len(every)} images in {root} cannot be decoded '
        f'(e.g. {_first(unreadable)}); fix or remove them, or raise '
        f'data.max_unreadable_fraction (now {max_unreadable_fraction}).')
  if unreadable:
    logging.warning('Skipping %d of %d images in %s that cannot be decoded: %s.',
                    len(unreadable), len(every), root, _first(unreadable))
  bad = set(unreadable)
  files = {split: [[p for p in paths if p not in bad] for paths in by_class]
           for split, by_class in files.items()}
  for c, paths in enumerate(files['train']):
    if not paths:
      raise UserError(f'class folder {os.path.join(class_root, class_names[c])} has no '
                      'readable image; add images or remove the folder.')
  if 'val' not in files:
    files = _hold_out(files['train'], root, val_fraction)
  paths, labels = {}, {}
  for split, by_class in files.items():
    pairs = [(p, c) for c, class_paths in enumerate(by_class) for p in class_paths]
    if split == 'train':  # a fixed mix of classes: a shuffle buffer under the split still mixes
      pairs.sort(key=lambda pair: _digest(pair[0], root))
    paths[split] = tuple(p for p, _ in pairs)
    labels[split] = tuple(c for _, c in pairs)
  return Folder(root, tuple(class_names), paths, labels, tuple(unreadable))


def decode(path: tf.Tensor) -> tf.Tensor:
  """The image file at `path` as uint8 (H, W, 3): grayscale, palette and RGBA become RGB.

  tf.io decodes JPEG, PNG, BMP and GIF (first frame) about 3x faster than Pillow
  under tf.data; WebP, which tf.io cannot read, goes through Pillow.
  """
  contents = tf.io.read_file(path)
  is_webp = tf.strings.regex_full_match(tf.strings.substr(contents, 0, 12), '(?s)RIFF....WEBP')
  image = tf.cond(
      is_webp,
      lambda: tf.numpy_function(_pillow_rgb, [contents], tf.uint8, stateful=False),
      lambda: tf.io.decode_image(contents, channels=3, expand_animations=False))
  image.set_shape((None, None, 3))
  return image


def list_images(patterns: list) -> list:
  """Image files named by `patterns`: files, directories (recursively) or globs; sorted."""
  import glob  # pylint: disable=g-import-not-at-top
  found = []
  for pattern in patterns:
    path = os.path.expanduser(str(pattern))
    matches = sorted(glob.glob(path, recursive=True)) if glob.has_magic(path) else (
        [path] if os.path.exists(path) else [])
    if not matches:
      raise UserError(f'--images {pattern}: no such file or directory'
                      + (' (the glob matches nothing)' if glob.has_magic(path) else '') + '.')
    for match in matches:
      if os.path.isdir(match):
        found += [p for p in _walk(match) if _is_image(p)]
      else:
        found.append(match)
  if not found:
    raise UserError(f"--images {' '.join(map(str, patterns))}: no images "
                    f"({', '.join(IMAGE_EXTENSIONS)}) found.")
  return sorted(dict.fromkeys(os.path.normpath(p) for p in found))


def _pillow_rgb(contents) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top  # only WebP needs it
  if isinstance(contents, np.ndarray):  # eager numpy_function passes a 0-d object array
    contents = contents.item()
  with Image.open(io.BytesIO(contents)) as image:
    return np.asarray(image.convert('RGB'))


def _layout(root):
  """(the folder of the training class folders, the validation split's folder or None).

  `root/train/` is a split only when `root` holds no folders but train/, val/ and
  test/: a class named `train` beside other classes would otherwise turn them into
  ignored folders, a classifier of the wrong classes.
  """
  folders = _class_folders(root, required=False)
  if 'train' not in folders:
    return root, None
  others = ', '.join(f + '/' for f in folders if f not in ('train', 'val', 'test'))
  if others:
    raise UserError(
        f'{root} has train/ beside {others}: split folders (train/, val/, test/) or class '
        f'folders? For splits move {others} out of {root}; for classes rename the class '
        'folder train/ (e.g. to trains/).')
  val, test = (os.path.join(root, f) if f in folders else None for f in ('val', 'test'))
  if val and test:
    logging.warning('Not reading %s: the validation split is %s.', test, val)
  elif test:
    logging.info('%s is the validation split (there is no %s).', test,
                 os.path.join(root, 'val'))
  return os.path.join(root, 'train'), val or test


def _class_folders(root, required=True):
  names = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith('.'))
  if required and len(names) < 2:
    found = f'only the class folder {names[0]!r}' if names else 'no class folders'
    raise UserError(f'{root} has {found}; a classifier needs at least two classes, '
                    f'as {root}/<class>/<image>.')
  return names


def _images_by_class(root, class_names, required=True):
  """Per class, the image files below `root/<class>` (recursively, sorted)."""
  by_class, ignored = [], []
  for name in class_names:
    folder = os.path.join(root, name)
    files = _walk(folder) if os.path.isdir(folder) else []
    images = [f for f in files if _is_image(f)]
    ignored += [f for f in files if not _is_image(f)]
    if required and not images:
      raise UserError(f'class folder {folder} has no images '
                      f"({', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder.")
    by_class.append(images)
  if ignored:
    logging.info('Ignoring %d files without an image extension in %s: %s.', len(ignored),
                 root, _first(ignored))
  return by_class


def _walk(root):
  return sorted(os.path.join(d, f) for d, subdirs, files in os.walk(root)
                for f in files if not f.startswith('.'))


def _is_image(path):
  return path.lower().endswith(IMAGE_EXTENSIONS)


def _hold_out(by_class, root, fraction):
  """A stratified, deterministic train/val split of per-class file lists."""
  train, val = [], []
  for paths in by_class:
    n = len(paths)
    k = min(max(round(n * fraction), 1 if fraction > 0 and n >= 2 else 0), n - 1)
    ranked = sorted(paths, key=lambda p: _digest(p, root))
    held = set(ranked[:k])
    val.append([p for p in paths if p in held])
    train.append([p for p in paths if p not in held])
  return {'train': train, 'val': val}


def _digest(path, root):
  return hashlib.sha256(os.path.relpath(path, root).encode()).hexdigest()


_checked = {}  # (path, size, mtime) -> decodable, so info() and the iterators decode once


def _unreadable(paths):
  """The paths that do not decode, decoding each file at most once per process."""
  keys = []
  for p in paths:
    stat = os.stat(p)
    keys.append((p, stat.st_size, stat.st_mtime_ns))
  todo = [k for k in keys if k not in _checked]
  if todo:
    start = time.perf_counter()
    ds = tf.data.Dataset.from_tensor_slices([k[0] for k in todo]).enumerate()
    ds = ds.map(lambda i, p: (i, tf.shape(decode(p))), num_parallel_calls=tf.data.AUTOTUNE)
    ok = {int(i) for i, shape in ds.ignore_errors().as_numpy_iterator() if shape.min() > 0}
    for i, key in enumerate(todo):
      _checked[key] = i in ok
    logging.info('Decoded %d images in %.1fs to check them.', len(todo),
                 time.perf_counter() - start)
  return [k[0] for k in keys if not _checked[k]]


def _first(paths):
  more = f' and {len(paths) - _SHOWN} more' if len(paths) > _SHOWN else ''
  return ', '.join(paths[:_SHOWN]) + more
