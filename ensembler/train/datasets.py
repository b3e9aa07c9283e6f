"""Torch datasets and transforms for training and validation.

Both yield ``(uint8 image (3, H, W), int target)``; normalisation (the Preprocess's mean and
std) happens on the device in the loop, as in the inference engine. Images are decoded with
:func:`ensembler.data.decode_image`: a corrupt file raises :class:`ImageDecodeError` naming
it, never skipped.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..errors import EnsemblerError
from ..names import AUGMENT_LEVELS
from ..preprocess import Preprocess


# ``auto`` on digits (a mirrored digit is another class, so never ``flip`` or ``standard``):
# ``light`` when fine-tuning; from scratch nothing at all, like the photos' flip-only rule
# (faces-utk: lighter augmentation won on short runs). Measured with bench_quality.py
# (digits, 64 px, 4 epochs, k=3, from scratch; OOF / held-out macro-F1; plain loop without
# augmentation resnet18 0.970 / 0.983, efficientnet_b0 0.888 / 0.935): ``light`` resnet18
# 0.977 / 0.978, efficientnet_b0 0.722 / 0.874; ``none`` 0.974 / 0.983 and 0.936 / 0.958.
DIGITS_AUGMENT = {"fine-tune": "light", "from-scratch": "none"}


def resolve_augment(augment: str, source_kind: str | None, regime: str = "fine-tune") -> str:
    """``auto`` -> by regime: ``standard`` when fine-tuning pretrained weights, ``flip`` from
    scratch (see :data:`ensembler.train.config.REGIME_DEFAULTS` for the measurements); on
    digits, whose mirror images change meaning, :data:`DIGITS_AUGMENT` (``light`` / ``none``)."""
    if augment == "auto":
        if source_kind == "digits":
            return DIGITS_AUGMENT[regime]
        from .config import REGIME_DEFAULTS

        return REGIME_DEFAULTS[regime]["augment"]
    if augment not in AUGMENT_LEVELS:
        raise EnsemblerError(f"--augment must be one of auto, {', '.join(AUGMENT_LEVELS)}; got {augment!r}")
    return augment


def train_transform(pre: Preprocess, augment: str):
    """PIL RGB -> augmented uint8 tensor of the Preprocess's input size.

    ``standard`` (photos, faces): RandomResizedCrop(scale 0.35-1, ratio 3/4-4/3), horizontal
    flip, colour jitter 0.2. ``light`` (digits, text, anything where a mirror image is another
    class): RandomResizedCrop(scale 0.7-1, ratio 0.9-1.1) and rotation up to 10 degrees, no
    flip. ``flip``: the eval transform and a random horizontal flip (short from-scratch runs,
    where heavier augmentation leaves the network under-fitted). ``none``: the eval transform
    (resize + centre crop). Random draws use torch's RNG,
    so seeding torch (and the loader's generator) makes augmentation reproducible.
    """
    from torchvision.transforms import v2 as T

    if augment == "none":
        return pre.geometry_transform()
    if augment == "flip":
        return T.Compose([pre.geometry_transform(), T.RandomHorizontalFlip()])
    interp = getattr(T.InterpolationMode, pre.interpolation.upper())
    if augment == "standard":
        ops = [
            T.RandomResizedCrop(pre.input_size, scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3), interpolation=interp,
                                antialias=True),
            T.RandomHorizontalFlip(),
            T.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
        ]
    elif augment == "light":
        ops = [
            T.RandomResizedCrop(pre.input_size, scale=(0.7, 1.0), ratio=(0.9, 1.1), interpolation=interp,
                                antialias=True),
            T.RandomRotation(10, interpolation=T.InterpolationMode.BILINEAR),
        ]
    else:
        raise EnsemblerError(f"unknown augmentation {augment!r}; choose one of {list(AUGMENT_LEVELS)}")
    # The ops run on the PIL image (PIL's resize/rotate are far cheaper per image than
    # torch's affine-grid kernels on the CPU), then become a uint8 tensor.
    return T.Compose(ops + [T.PILToTensor(), T.ToDtype(torch.uint8)])


class ImageDataset(torch.utils.data.Dataset):
    """Images at ``paths`` with integer ``targets``, through ``transform``.

    Examples
    --------
    >>> ds = ImageDataset(table.paths, labels, Preprocess().geometry_transform())  # doctest: +SKIP
    >>> image, target = ds[0]  # doctest: +SKIP
    """

    def __init__(self, paths: Sequence[str], targets: Sequence[int], transform):
        if len(paths) != len(targets):
            raise EnsemblerError(f"{len(paths)} image paths but {len(targets)} targets")
        self.paths = [str(p) for p in paths]
        self.targets = np.asarray(targets, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from ..data import decode_image
        from ..errors import DataError, ImageDecodeError

        try:
            image = decode_image(self.paths[i])
        except ImageDecodeError as exc:
            # DataError takes one argument, so a DataLoader worker can re-raise it in the
            # main process (ImageDecodeError's two-argument constructor would become a
            # RuntimeError there). Never skipped: a bad image stops training, named.
            raise DataError(str(exc)) from None
        return self.transform(image), int(self.targets[i])


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed python and numpy from the worker's torch seed.

    torch seeds each worker from the loader's generator; python's ``random`` and numpy are
    seeded here so any augmentation that uses them is reproducible too.
    """
    import random

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(dataset, *, batch_size: int, shuffle: bool, workers: int, generator=None,
                drop_last: bool = False, pin_memory: bool = False):
    """A DataLoader with reproducible shuffling and worker seeding."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        generator=generator,
        worker_init_fn=seed_worker if workers > 0 else None,
        drop_last=drop_last,
        pin_memory=pin_memory,
        persistent_workers=False,
    )
