"""`UserError`: a mistake in the user's data, config, checkpoint or command line.

The CLI prints these as one line naming the file, line or key and the fix, and exits non-zero,
instead of a traceback. Programming errors stay ordinary exceptions.
"""


class UserError(ValueError):
    """A problem the user can fix; the message says where and how."""


def one_line(message: str) -> str:
    """A message as the terminal shows it: every run of whitespace (newlines too) one space."""
    return " ".join(message.split())
