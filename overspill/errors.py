"""User-facing errors: one line that says what went wrong and what to do about it."""


class OverspillError(Exception):
    """An error caused by the user's input or machine, printed without a traceback by the CLI."""
