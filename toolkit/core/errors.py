"""The one error type users see.

Anything the user can fix (a bad flag, a missing file, a malformed recipe) raises `UserError`;
the CLI prints its message as one line and exits with status 2. Everything else is a bug and
keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one line and exit status 2."""

    exit_code = 2
