"""Which torch device a run uses: one rule for training and inference alike."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import EnsemblerError

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["resolve_device"]


def resolve_device(device=None) -> "torch.device":
    """``None`` or ``"auto"``: CUDA when available, else the CPU; otherwise that device.

    Raises
    ------
    EnsemblerError
        ``device`` is not a torch device name, or names CUDA on a machine without it.

    Examples
    --------
    >>> resolve_device("cpu").type
    'cpu'
    >>> resolve_device("gpu")
    Traceback (most recent call last):
    ...
    ensembler.errors.EnsemblerError: device 'gpu' is not a device (use cpu, cuda or cuda:N)
    """
    import torch

    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, torch.device):
        dev = device
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError):
            raise EnsemblerError(f"device {device!r} is not a device (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise EnsemblerError(f"device {str(device)!r}: CUDA is not available on this machine; use cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise EnsemblerError(f"device {str(device)!r}: this machine has {count} CUDA device(s), "
                                 f"cuda:0..cuda:{count - 1}")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise EnsemblerError(f"device {str(device)!r}: MPS is not available on this machine; use cpu")
    elif dev.type != "cpu":
        raise EnsemblerError(f"device {str(device)!r} is not supported here (use cpu, cuda or cuda:N)")
    return dev
