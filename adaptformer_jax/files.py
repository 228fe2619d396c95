"""Files written whole or not at all."""
import os


def write_atomic(path: str, content: str | bytes) -> None:
  """Writes `content` to `path` through a temporary file and a rename.

  A kill, a full disk or Ctrl-C mid-write leaves the previous file (or none),
  never a truncated one; so a job may be stopped at any point without loss.
  """
  tmp = path + '.tmp'
  with open(tmp, 'wb' if isinstance(content, bytes) else 'w') as f:
    f.write(content)
  os.replace(tmp, path)
