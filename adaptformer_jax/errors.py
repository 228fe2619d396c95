"""User-facing errors: the CLI prints these as one line and exits non-zero."""


class UserError(Exception):
  """A mistake the user can fix; the message names the problem and the fix."""


class ConfigError(UserError, ValueError):
  """An invalid configuration value (also a ValueError for library callers)."""
