"""User-facing errors: the CLI prints these as one line and exits non-zero."""
import difflib
from collections.abc import Iterable


class UserError(Exception):
  """A mistake the user can fix; the message names the problem and the fix."""


class ConfigError(UserError, ValueError):
  """An invalid configuration value (also a ValueError for library callers)."""


def did_you_mean(name: object, choices: Iterable[str]) -> str:
  """' (did you mean 'x'?)' for the closest of `choices`, or '' when none is close."""
  close = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.6)
  return f' (did you mean {close[0]!r}?)' if close else ''


def first_line(error: BaseException, limit: int = 1000) -> str:
  """The gist of a library exception for a one-line message: its first line, cut
  with '…' only past `limit` characters (paths in it can be long; their ends matter)."""
  line = (str(error).strip().splitlines() or [type(error).__name__])[0]
  return line if len(line) <= limit else line[:limit] + '…'


def described(error: BaseException) -> str:
  """'ValueError: its first line', or only the type's name when the message is empty."""
  line = first_line(error)
  name = type(error).__name__
  return name if line == name else f'{name}: {line}'
