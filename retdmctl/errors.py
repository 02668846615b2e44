"""One exception hierarchy for every error a user can cause.

The CLI catches :class:`RetdmError` once, prints ``error: <message>`` on one line and
exits with code 1 (2 for a :class:`UsageError`). Anything else is a bug and keeps its
traceback.
"""


class RetdmError(Exception):
    """An expected, user-facing failure (bad input, missing stage, bad config)."""


class ConfigError(RetdmError):
    """A configuration value or file is invalid."""


class InputError(RetdmError):
    """A dataset file, image or label file is missing or malformed."""


class StageNotReadyError(RetdmError):
    """A stage's inputs do not exist yet; the message names the command to run first."""


class BackboneError(RetdmError):
    """An unknown backbone name or missing pretrained weights."""


class WorkspaceBusyError(RetdmError):
    """Another process is writing the same workspace."""


class CheckpointError(RetdmError):
    """A checkpoint is unreadable or does not fit the model it is loaded into."""


class UsageError(RetdmError):
    """A bad option value, flag combination or ``--set`` on the command line: exit code 2."""
