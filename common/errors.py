"""The one exception type for bad user input."""


class UserError(Exception):
    """Bad input from the user: printed as one line, exit code 2, no traceback."""
