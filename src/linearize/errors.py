"""The one error type that reaches the user.

Raise `LinearizeError` for anything the user can fix (a wrong path, an unsupported model, a bad
option). Its message says what went wrong and what to do; the CLI prints it without a traceback.
Bugs stay ordinary exceptions, so their tracebacks still show.
"""


class LinearizeError(Exception):
    """A user-facing error whose message tells the user what to do."""
