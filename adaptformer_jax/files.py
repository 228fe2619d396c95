"""Files written whole or not at all, and read back."""
import json
import os
from typing import Any


def write_atomic(path: str, content: str | bytes) -> None:
  """Writes `content` to `path` through a temporary file and a rename.

  A kill, a full disk or Ctrl-C mid-write leaves the previous file (or none),
  never a truncated one; so a job may be stopped at any point without loss.
  """
  tmp = path + '.tmp'
  with open(tmp, 'wb' if isinstance(content, bytes) else 'w') as f:
    f.write(content)
  os.replace(tmp, path)


def read_json(path: str) -> Any:
  """The JSON value in `path` (as `write_atomic` left it), or None if there is no file."""
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)
