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
    """A configuration key is unknown, has the wrong type, or points to a missing file."""


class DataError(MetattnError, ValueError):
    """A data file is missing, corrupt or laid out differently from what the loader expects."""


class CheckpointError(MetattnError, RuntimeError):
    """A checkpoint is missing, corrupt or belongs to an incompatible run."""


class TrainingError(MetattnError, RuntimeError):
    """Meta-training cannot go on (a non-finite meta-loss, say); saved work is kept."""
