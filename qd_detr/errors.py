"""Exceptions for bad input that a user can fix.

Command-line tools catch ``ToolkitError`` and print ``str(exc)`` as one line on stderr, then exit
with code 2. Messages name the file and the problem, and, where there is one, the fix.
"""

__all__ = ["ToolkitError", "CheckpointError", "DataError", "ConfigError"]


class ToolkitError(Exception):
    """Base class: bad input (file, option or data) rather than a bug."""


class CheckpointError(ToolkitError):
    """A checkpoint cannot be read or does not match the architecture its options describe."""


class DataError(ToolkitError):
    """An annotation or feature file is missing, malformed or disagrees with the model."""


class ConfigError(ToolkitError):
    """Options contradict each other or the checkpoint."""
