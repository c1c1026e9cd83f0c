"""The one error type users see: a single line naming what is wrong and how to fix it."""


class MergeError(Exception):
    """A problem with the user's input (recipe, models, files), reported as one line.

    The command line prints ``error: <message>`` and exits with status 2; no traceback, because the
    fix is in the input, not in the code.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
