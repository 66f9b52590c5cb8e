"""Exceptions for bad input that a user can fix.

Command-line tools catch ``ToolkitError`` and print ``str(exc)`` as one line on stderr, then exit
with code 2. Messages name the file and the problem, and, where there is one, the fix.
"""

__all__ = ["ToolkitError", "CheckpointError", "DataError", "ConfigError", "IncompatibleModelError", "NoFusionError"]


class ToolkitError(Exception):
    """Base class: bad input (file, option or data) rather than a bug."""


class CheckpointError(ToolkitError):
    """A checkpoint cannot be read or does not match the architecture its options describe."""


class DataError(ToolkitError):
    """An annotation or feature file is missing, malformed or disagrees with the model."""


class ConfigError(ToolkitError):
    """Options contradict each other or the checkpoint."""


class IncompatibleModelError(CheckpointError):
    """The model was read, but it cannot be made trackable without changing it (reason in the message)."""


class NoFusionError(ConfigError):
    """The model has no audio-visual fusion module, hence no gates.

    Not an AttributeError on purpose: ``nn.Module.__getattr__`` would replace its message.
    """
