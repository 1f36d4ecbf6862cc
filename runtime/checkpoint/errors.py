"""The one error type of checkpoint loading: the message names the file, tensor or field and the limit."""


class CheckpointError(Exception):
    """A checkpoint that cannot be loaded; `str(e)` is a complete, user-facing explanation."""
