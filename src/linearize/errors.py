"""The one error type that reaches the user.

Raise `LinearizeError` for anything the user can fix (a wrong path, an unsupported model, a bad
option). Its message says what went wrong and what to do; the CLI prints it without a traceback.
Bugs stay ordinary exceptions, so their tracebacks still show.
"""


class LinearizeError(Exception):
    """A user-facing error whose message tells the user what to do. `every_rank`: every process of a torchrun
    run raises it alike (a setting refused before any work), so only rank 0 prints it."""

    def __init__(self, message: str = "", every_rank: bool = False):
        super().__init__(message)
        self.every_rank = every_rank
