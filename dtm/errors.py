"""Errors a user can act on. Each carries a message that names what is wrong and where."""


class DTMError(Exception):
    """A problem with the user's input or environment (not a bug). CLI exit code 2."""

    exit_code = 2


class DataError(DTMError):
    """Instruction data that cannot be used as given."""


class RegistryError(DTMError):
    """The run registry cannot be read or written."""


class ConfigError(DTMError):
    """An option or parameter out of its valid range."""


class StorageError(DTMError):
    """A save failed for lack of room (disk full, quota, size limit) or permission; what
    was there before is left as it was."""


class TrainingError(DTMError):
    """The run could not go on (a non-finite loss, a failed save); the message says
    what was kept."""


class Stopped(DTMError):
    """The run stopped on request after saving a checkpoint; it can be resumed."""

    exit_code = 3
