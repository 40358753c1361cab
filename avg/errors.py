"""Errors a user can fix from the message alone; the CLI prints them without a traceback."""


class UserError(Exception):
    """Bad input: the message names the problem and the fix (which file, which key)."""
