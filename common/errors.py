"""User-facing errors: the CLIs print these as one line and exit non-zero, without a traceback."""


class UserError(Exception):
    """Something the user gave us is wrong (a path, a key, a value, a file's contents)."""
