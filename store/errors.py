"""The one error hierarchy of diffprobe.

Every user mistake (bad config, unknown block, corrupt image, mismatched store) raises a
subclass of `DiffprobeError`; the CLIs turn it into one line on stderr and exit code 2.
Anything else is a bug and keeps its traceback.
"""


class DiffprobeError(ValueError):
    """Base class: a user-facing error whose message is one complete line."""


class ConfigError(DiffprobeError):
    """A key of pipeline.toml (or a CLI flag overriding it) is unknown, mistyped or out of range."""


class BlockError(DiffprobeError):
    """A block number, timestep or pool size outside what the model or store holds."""


class CheckpointError(DiffprobeError):
    """A checkpoint that cannot be read or does not match the architecture."""


class ImageError(DiffprobeError):
    """An image source that is missing, empty or holds an unreadable file."""


class StoreError(DiffprobeError):
    """A store that is missing, read-only, incomplete or of an unknown schema."""


class FingerprintMismatch(StoreError):
    """A run whose model, preprocessing, noise or dataset differs from the store's."""


class StoreLocked(StoreError):
    """Another `extract run` holds the store's write lock."""


class OutputError(DiffprobeError):
    """A result file or folder (CSV, picture, ledger) that cannot be written."""
