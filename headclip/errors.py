"""Exceptions users see, in a module that imports nothing heavy."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or does not fit the backbone."""
