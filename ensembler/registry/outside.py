"""Import of outside checkpoints (``.pth``, ``.pth.tar``, ``.pt``, ``.bin``, ``.ckpt``,
``.safetensors``): read with ``weights_only=True`` (never full unpickling), wrapper prefixes
stripped, checked key by key against the declared architecture and head, then added to the
registry like any other checkpoint."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, Sequence

from .._io import sha256_file
from ..errors import RegistryError
from ..labels import LabelSpace
from ..preprocess import Preprocess, check_input_size
from .entry import Entry
from .weights import default_model_kwargs


def import_checkpoint(registry, path, *, arch: str, num_classes: int | None = None, label_space=None,
                      family: str | None = None, fold: int | None = None,
                      img_size: int | Sequence[int] | None = None, head: str = "flat",
                      use_ema: bool | None = None, entry_id: str | None = None,
                      overwrite: bool = False, metrics: dict | None = None,
                      target: str | None = None) -> Entry:
    """Import an outside checkpoint (``.pth``, ``.pth.tar``, ``.pt``, ``.bin``, ``.ckpt``,
    ``.safetensors``) after checking it against ``arch`` and ``head``.

    Parameters
    ----------
    path : path
    arch : str
        timm architecture the weights belong to.
    num_classes : int, optional
        Classes named "0".."N-1"; or give ``label_space`` (a LabelSpace, its dict, or a
        list of class names). A factored head needs a factored LabelSpace.
    family, fold : optional
        Default family: the file name without its suffix.
    img_size : int or (H, W), optional
        Input size; default: the architecture's timm pretrained config.
    head : {"flat", "factored"}
    use_ema : bool, optional
        Required when the file holds both EMA and non-EMA weights.

    Raises
    ------
    RegistryError
        Unreadable or unsafe file (never unpickled beyond tensors), ambiguous EMA, keys or
        shapes that do not match (each listed with both shapes), non-finite values.
    """
    import torch

    from ..models import check_arch, check_state_dict, expected_state_shapes, read_outside_checkpoint

    path = Path(path)
    check_arch(arch)
    ls = label_space_for_import(num_classes, label_space)
    if family is None:
        family = family_from_path(path)
    if img_size is not None:
        check_input_size(img_size, "--img-size")
    pre = Preprocess.from_timm(arch, img_size)
    model_kwargs = default_model_kwargs(arch, pre)
    outside = read_outside_checkpoint(path, use_ema=use_ema)
    expected = expected_state_shapes(arch, ls, head, model_kwargs)
    state, dropped = select_model_keys(outside.state_dict, expected)
    # Old checkpoints lack BatchNorm's num_batches_tracked counters; eval never reads them.
    for key, shape in expected.items():
        if key.endswith("num_batches_tracked") and key not in state and shape == ():
            state[key] = torch.tensor(0, dtype=torch.long)
    check_state_dict(state, arch, label_space=ls, head=head, source=f"checkpoint {path}",
                     model_kwargs=model_kwargs)
    info = outside.describe()
    if dropped:
        info["dropped_keys"] = dropped
    info["path"] = str(path.resolve())
    info["sha256"] = sha256_file(path)
    return registry.add(state, family=family, fold=fold, arch=arch, head=head, label_space=ls,
                        preprocess=pre, metrics=metrics, target=target,
                        train_config={"import": info}, entry_id=entry_id, overwrite=overwrite,
                        model_kwargs=model_kwargs, check=False)


def select_model_keys(state: dict, expected: Mapping[str, tuple]) -> tuple[dict, list[str]]:
    """A Lightning module's state dict holds the network under ``model.`` next to other
    modules (``criterion.weight``, ``ema.*``, metric buffers). When stripping one wrapper
    prefix from the keys that carry it gives exactly the architecture's keys, keep those and
    report the rest as dropped; otherwise return ``state`` unchanged (the key check will list
    every difference)."""
    from ..models import WRAPPER_PREFIXES

    if set(state) == set(expected):
        return state, []
    for prefix in WRAPPER_PREFIXES:
        inner = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        core = {k for k in expected if not k.endswith("num_batches_tracked")}
        if inner and core <= set(inner) <= set(expected):
            return inner, sorted(k for k in state if not k.startswith(prefix))
    return state, []


def label_space_for_import(num_classes, label_space) -> LabelSpace:
    """The imported model's classes: a LabelSpace, its dict, class names, or "0".."N-1"."""
    if label_space is not None:
        flag = "--classes" if not isinstance(label_space, (LabelSpace, Mapping)) else "--label-space"
        try:
            if isinstance(label_space, LabelSpace):
                ls = label_space
            elif isinstance(label_space, Mapping):
                ls = LabelSpace.from_dict(dict(label_space))
            else:
                ls = LabelSpace(tuple(str(c) for c in label_space))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise RegistryError(f"{flag}: not a valid set of classes ({exc})") from None
        if num_classes is not None and int(num_classes) != ls.num_classes:
            raise RegistryError(
                f"--num-classes {num_classes} disagrees with the {ls.num_classes} classes given")
        return ls
    if num_classes is None:
        raise RegistryError("importing a checkpoint needs --num-classes N or --classes a,b,c")
    if isinstance(num_classes, bool) or int(num_classes) < 2:
        raise RegistryError(f"--num-classes must be an integer >= 2, got {num_classes!r}")
    return LabelSpace(tuple(str(i) for i in range(int(num_classes))))


def family_from_path(path: Path) -> str:
    """Default family of an imported file: its name without the checkpoint suffix."""
    from ..models import checkpoint_suffix

    suffix = checkpoint_suffix(path)
    stem = path.name[: -len(suffix)] if suffix else path.stem
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", stem).strip("-._+") or "imported"
