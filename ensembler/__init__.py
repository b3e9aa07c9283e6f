"""ensembler: the best prediction a pile of trained image classifiers can make together.

The public API is re-exported here; plumbing lives in private modules. Importing ensembler
does not import torch: heavy modules load when their function is first used.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    DataError,
    EnsemblerError,
    ImageDecodeError,
    IntegrityError,
    LogitError,
    RegistryError,
    WriteError,
)
from .labels import Factor, LabelSpace  # noqa: E402
from .preprocess import Preprocess  # noqa: E402

__all__ = [
    "__version__",
    "DataError",
    "EnsemblerError",
    "Factor",
    "ImageDecodeError",
    "IntegrityError",
    "LabelSpace",
    "LogitError",
    "Preprocess",
    "RegistryError",
    "WriteError",
]
