"""The one exception type for problems a user can fix (bad input, missing data, unknown names)."""


class OODBenchError(Exception):
    """A user-facing error: the CLI prints its message on one line (traceback only with --debug).

    The message must say what was wrong and how to fix it.
    """


class NotFittedError(OODBenchError):
    """A method scored before its statistics were fitted (or loaded)."""
