"""Decoding for inference: each image decoded once per geometry in loader workers, errors as data.

A decode error inside a DataLoader worker process is returned, not raised (the DataLoader
re-raises worker exceptions as a generic RuntimeError that loses the file name);
:func:`raise_decode_errors` raises the first one, naming the file.
"""

from __future__ import annotations

from typing import Sequence

from ..errors import ImageDecodeError

__all__ = ["make_decode_loader", "raise_decode_errors"]


class _DecodeDataset:
    """Decodes each image once and applies the group's geometry; errors travel as data.

    A decode error inside a worker process is returned, not raised, because the DataLoader
    re-raises worker exceptions as a generic RuntimeError that loses the file name.
    """

    def __init__(self, paths: Sequence[str], transform, size: tuple[int, int]):
        self.paths = [str(p) for p in paths]
        self.transform = transform
        self.size = tuple(size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        import torch

        from ..data import decode_image

        try:
            img = self.transform(decode_image(self.paths[i]))
            return i, img, ""
        except ImageDecodeError as exc:
            err = f"{exc.path}\0{exc.reason}"
        except Exception as exc:  # noqa: BLE001 - any failure on one file names that file
            err = f"{self.paths[i]}\0{type(exc).__name__}: {exc}"
        return i, torch.zeros((3, *self.size), dtype=torch.uint8), err


def make_decode_loader(paths, pre, batch_size: int, workers: int, pin: bool):
    """A DataLoader yielding ``(index, uint8 images (B, 3, H, W), errors)`` for ``paths``: each image
    decoded once with ``pre``'s resize/centre crop; a decode failure travels as ``path\0reason``
    in ``errors`` (see :func:`raise_decode_errors`)."""
    from torch.utils.data import DataLoader

    ds = _DecodeDataset(paths, pre.geometry_transform(), pre.input_size)
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=pin,
                      drop_last=False, prefetch_factor=2 if workers > 0 else None)


def raise_decode_errors(errors) -> None:
    """Loader workers return decode failures as data (``path\0reason``): raise the first,
    naming the file (a DataLoader would otherwise wrap it and lose the name)."""
    bad = [err for err in errors if err]
    if bad:
        path, _, reason = bad[0].partition("\0")
        raise ImageDecodeError(path, reason)
