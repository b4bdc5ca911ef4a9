"""The one exception type for bad input: main prints its message on one line and exits 2."""


class UserError(Exception):
  """A problem with the user's input or environment, with the fix in the message."""
