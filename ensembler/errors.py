"""Exceptions raised by ensembler.

Every error a user can cause (bad file, bad flag, mismatched logits) derives from
:class:`EnsemblerError`, so the CLI can print its message and exit non-zero without a
traceback. Messages name the offending file, row, id or flag.
"""

from __future__ import annotations


class EnsemblerError(Exception):
    """Base class of every user-facing error."""


class DataError(EnsemblerError, ValueError):
    """Bad dataset input: a missing/corrupt image, a bad CSV, an unknown class, bad folds."""


class ImageDecodeError(DataError):
    """An image could not be decoded. ``path`` names the file."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot decode image {self.path}: {reason}")

    def __reduce__(self):  # pickled back whole (a worker process or a Ray task raised it)
        return type(self), (self.path, self.reason)


class RegistryError(EnsemblerError):
    """The checkpoint registry was asked for something it does not hold or cannot accept."""


class IntegrityError(RegistryError):
    """A file on disk does not match what the registry recorded (sha256, finite tensors)."""


class LogitError(EnsemblerError, ValueError):
    """Logits that cannot be used: NaN, wrong class count, ids that do not match."""


class ParameterError(EnsemblerError, ValueError):
    """A bad value for a parameter of a library call (a vote rule, weights, a temperature...).

    ``parameter`` names it as the Python API spells it (the CLI flag is its ``--dashed``
    form); the message names it too, so a Python caller and a CLI user both know what to fix.

    >>> raise ParameterError("rounds", "rounds must be a positive integer, got 0")
    Traceback (most recent call last):
    ...
    ensembler.errors.ParameterError: rounds must be a positive integer, got 0
    """

    def __init__(self, parameter: str, message: str):
        self.parameter = parameter
        super().__init__(message)


class WriteError(EnsemblerError):
    """A file could not be written (full disk, read-only folder, no permission).

    ``path`` names the file; nothing half-written is left behind (see :mod:`ensembler._io`).
    """

    path: str = ""
    errno: int | None = None
