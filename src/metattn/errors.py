"""Exception types of metattn.

Every error names the offending field, the value it had and the fix, so that a user reading
only the last line of a traceback knows what to change.
"""

from __future__ import annotations


class MetattnError(Exception):
    """Base class of every error raised on purpose by metattn."""


class TaskError(MetattnError, ValueError):
    """A task batch (support/query sets) is malformed: wrong shapes, empty sets, bad labels."""


class InnerLoopError(MetattnError, FloatingPointError):
    """The inner (adaptation) loop produced a non-finite loss."""


class ConfigError(MetattnError, ValueError):
    """A configuration key is unknown, has the wrong type, or points to a missing file.

    ``key``: the option at fault, when the message is ``"{key}=...; the fix"``; ``owner``
    prefixes it in Python (``MAML: inner_steps=-1; ...``), and a config section names it
    by its full key instead (``learner.inner_steps=-1; ...``, see
    :func:`metattn.registry.build`)."""

    def __init__(self, message: str, key: str | None = None, owner: str | None = None):
        super().__init__(f"{owner}: {message}" if owner else message)
        self.key, self.detail = key, message


class DataError(MetattnError, ValueError):
    """A data file is missing, corrupt or laid out differently from what the loader expects."""


class CheckpointError(MetattnError, RuntimeError):
    """A checkpoint is missing, corrupt or belongs to an incompatible run."""


class TrainingError(MetattnError, RuntimeError):
    """Meta-training cannot go on (a non-finite meta-loss, say); saved work is kept."""
