"""Model construction (any timm architecture, flat, factored or multilabel head) and safe
loading of outside checkpoints.

Heads (flat, factored, multilabel) and their joint log-probabilities are :mod:`ensembler.heads`
(re-exported here).

Outside checkpoints (``.pth``, ``.pth.tar``, ``.pt``, ``.bin``, ``.ckpt``, ``.safetensors``)
are read by :func:`load_outside_state_dict`: pickled files only ever with
``torch.load(..., weights_only=True)`` passed explicitly, never a fallback to full
unpickling, because unpickling an untrusted file runs arbitrary code.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from .errors import EnsemblerError, RegistryError
from .heads import (HEADS, as_label_space, check_head, head_blocks, head_num_outputs,  # noqa: F401
                    joint_log_probs, joint_logits)
from .labels import LabelSpace

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn


#: Suffixes :func:`load_outside_state_dict` reads. ``.ckpt`` is PyTorch Lightning's.
CHECKPOINT_SUFFIXES = (".pth", ".pth.tar", ".pt", ".bin", ".ckpt", ".safetensors")

# Prefixes that wrappers add to every key: DataParallel/DDP, torch.compile, Lightning modules.
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")
_PLAIN_KEYS = ("state_dict", "model")
_EMA_KEYS = ("state_dict_ema", "model_ema")


# ---------------------------------------------------------------------------- construction
def check_arch(arch: str) -> None:
    """Raise an EnsemblerError naming close matches when ``arch`` is not a timm model."""
    import timm

    if not isinstance(arch, str) or not arch:
        raise EnsemblerError(f"arch must be a timm model name, got {arch!r}")
    if timm.is_model(arch):
        return
    names = timm.list_models()
    close = difflib.get_close_matches(arch, names, n=5, cutoff=0.6)
    if not close:  # substring matches help for short names such as "effnet"
        close = [n for n in names if arch.lower() in n][:5]
    hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
    raise EnsemblerError(f"unknown timm architecture {arch!r}{hint}")


def create_model(arch: str, *, label_space, head: str = "flat", pretrained: bool = False,
                 pretrained_path: str | Path | None = None, pretrained_use_ema: bool | None = None,
                 **timm_kwargs) -> "nn.Module":
    """Build a timm model whose classifier matches ``label_space`` and ``head``.

    Parameters
    ----------
    arch : str
        Any timm architecture name (``timm.list_models()``), with or without a pretrained tag.
    label_space : LabelSpace or dict
        The classes; a factored head needs a factored space.
    head : {"flat", "factored", "multilabel"}
        ``flat``: ``num_classes`` outputs. ``factored``: one block per factor, concatenated.
    pretrained : bool
        Download timm's pretrained backbone weights (needs network access).
    pretrained_path : path, optional
        Local backbone weights instead of a download (any file :func:`load_outside_state_dict`
        reads). Implies ``pretrained``. The classifier is re-initialised when its size differs,
        exactly as for downloaded weights (timm's ``pretrained_cfg_overlay=dict(state_dict=...)``).
    pretrained_use_ema : bool, optional
        Which weights of ``pretrained_path`` to use when it holds both EMA and plain weights.
    **timm_kwargs
        Passed to ``timm.create_model`` (``drop_rate``, ``img_size``, ...).

    Returns
    -------
    torch.nn.Module

    Examples
    --------
    >>> from ensembler import LabelSpace
    >>> m = create_model("test_resnet", label_space=LabelSpace.mask(), head="factored")
    >>> m.num_classes
    8
    """
    import timm

    ls = as_label_space(label_space)
    check_arch(arch)
    num_outputs = head_num_outputs(ls, head)
    if "num_classes" in timm_kwargs and timm_kwargs.pop("num_classes") != num_outputs:
        raise EnsemblerError(
            f"num_classes is set by label_space and head ({num_outputs} outputs); do not pass it"
        )
    if pretrained_path is not None:
        state_dict = load_outside_state_dict(pretrained_path, use_ema=pretrained_use_ema)
        overlay = dict(timm_kwargs.pop("pretrained_cfg_overlay", None) or {})
        overlay["state_dict"] = state_dict
        # timm keeps the file's classifier only when the cfg's num_classes equals ours; the cfg
        # describes timm's hub weights, so tell it how many classes *this* file's classifier has.
        cfg = timm.get_pretrained_cfg(arch)
        classifiers = getattr(cfg, "classifier", None) if cfg is not None else None
        for name in ([classifiers] if isinstance(classifiers, str) else list(classifiers or ())):
            weight = state_dict.get(f"{name}.weight")
            if weight is not None and weight.ndim >= 1:
                overlay.setdefault("num_classes", int(weight.shape[0]))
                break
        try:
            return timm.create_model(arch, pretrained=True, num_classes=num_outputs,
                                     pretrained_cfg_overlay=overlay, **timm_kwargs)
        except RuntimeError as exc:  # load_state_dict size/key mismatch in the backbone
            raise RegistryError(
                f"pretrained weights {pretrained_path} do not fit {arch}: {exc}"
            ) from exc
    if not pretrained:
        return timm.create_model(arch, pretrained=False, num_classes=num_outputs, **timm_kwargs)
    try:
        return timm.create_model(arch, pretrained=True, num_classes=num_outputs, **timm_kwargs)
    except Exception as exc:  # noqa: BLE001 - hub/urllib/timm raise many types when offline
        raise EnsemblerError(
            f"pretrained weights for {arch!r} could not be downloaded ({type(exc).__name__}: {exc}). "
            f"Train from scratch with --no-pretrained (pretrained=False), or use local weights "
            f"with --pretrained-path PATH (create_model(..., pretrained_path=PATH)), "
            f"e.g. a timm .safetensors/.pth file copied from a machine with hub access."
        ) from exc


def expected_state_shapes(arch: str, ls: LabelSpace, head: str, model_kwargs: dict | None = None) -> dict:
    """{key: shape} of the state dict ``create_model`` would produce, without allocating weights."""
    import json

    kwargs_key = json.dumps(model_kwargs or {}, sort_keys=True, default=str)
    return dict(_cached_state_shapes(arch, head, head_num_outputs(ls, head), kwargs_key, ls))


@functools.lru_cache(maxsize=64)
def _cached_state_shapes(arch: str, head: str, num_outputs: int, kwargs_key: str, ls: LabelSpace) -> tuple:
    # Building a model (even on the meta device) costs ~50 ms; verify/add/import ask often.
    import json

    import torch

    kwargs = json.loads(kwargs_key)
    try:
        with torch.device("meta"):
            model = create_model(arch, label_space=ls, head=head, **kwargs)
    except EnsemblerError:
        raise
    except Exception:  # noqa: BLE001 - some init functions do not run on meta tensors
        model = create_model(arch, label_space=ls, head=head, **kwargs)
    return tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------- state dicts
@dataclass
class StateDictCheck:
    """How a state dict differs from what an architecture expects."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # key, given, expected

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self, limit: int = 12) -> str:
        def cut(items):
            items = list(items)
            more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
            return ", ".join(items[:limit]) + more

        lines = []
        if self.mismatched:
            lines.append("shape mismatch: " + cut(
                f"{k} checkpoint {list(g)} vs model {list(e)}" for k, g, e in self.mismatched))
        if self.missing:
            lines.append("missing: " + cut(self.missing))
        if self.unexpected:
            lines.append("unexpected: " + cut(self.unexpected))
        return "; ".join(lines)


def compare_state_dict(state_dict: Mapping[str, Any], expected_shapes: Mapping[str, tuple]) -> StateDictCheck:
    """Compare keys and shapes of ``state_dict`` with ``expected_shapes`` ({key: shape})."""
    check = StateDictCheck()
    for key, shape in expected_shapes.items():
        if key not in state_dict:
            check.missing.append(key)
        elif tuple(state_dict[key].shape) != tuple(shape):
            check.mismatched.append((key, tuple(state_dict[key].shape), tuple(shape)))
    check.unexpected = [k for k in state_dict if k not in expected_shapes]
    return check


def check_state_dict(state_dict: Mapping[str, Any], arch: str, *, label_space, head: str = "flat",
                     source: str = "state dict", model_kwargs: dict | None = None,
                     error=RegistryError) -> None:
    """Raise ``error`` listing every missing, unexpected and mis-shaped key of ``state_dict``
    against ``arch`` with ``head`` over ``label_space``; the message names ``source``."""
    ls = as_label_space(label_space)
    expected = expected_state_shapes(arch, ls, head, model_kwargs)
    check = compare_state_dict(state_dict, expected)
    if check.ok:
        return
    n_out = head_num_outputs(ls, head)
    msg = (f"{source} does not match {arch} with a {head} head of {n_out} outputs: "
           f"{check.describe()}")
    hint = _class_count_hint(check, n_out)
    raise error(msg + hint)


def _class_count_hint(check: StateDictCheck, n_out: int) -> str:
    # A classifier weight/bias whose leading dim is the only difference is a class-count mismatch.
    for key, given, expected in check.mismatched:
        if given and expected and given[0] != expected[0] and expected[0] == n_out and given[1:] == expected[1:]:
            return (f" (class-count mismatch: the checkpoint's {key.rsplit('.', 1)[0]} has {given[0]} "
                    f"outputs, the declared head {n_out})")
    return ""


def check_finite(state_dict: Mapping[str, Any], source: str, error=RegistryError) -> None:
    """Raise ``error`` naming ``source`` and the keys of floating tensors holding NaN/inf."""
    import torch

    floats = [(k, v) for k, v in state_dict.items() if torch.is_tensor(v) and v.is_floating_point()]
    if not floats:
        return
    # x*0 is 0 for finite x and NaN for NaN/inf, so one sum per tensor says whether all are
    # finite; that is ~30x faster than torch.isfinite(...).all() on the CPU and never overflows.
    zero_sums = torch.stack([v.detach().mul(0).sum(dtype=torch.float32) for _, v in floats])
    if bool((zero_sums == 0).all()):
        return
    bad = [k for k, v in floats if not bool(torch.isfinite(v).all())]
    more = f" ... and {len(bad) - 8} more" if len(bad) > 8 else ""
    raise error(f"{source} holds non-finite (NaN/inf) values in {', '.join(bad[:8])}{more}; refused")


def checkpoint_suffix(path: Path) -> str:
    """The checkpoint suffix of ``path`` (``.pth.tar`` counts as one), lower-case."""
    name = path.name.lower()
    for s in sorted(CHECKPOINT_SUFFIXES, key=len, reverse=True):
        if name.endswith(s):
            return s
    return path.suffix.lower()


def _torch_load_weights_only(path: Path):
    import torch

    _refuse_non_torch_file(path)
    # timm's train script stores its argparse.Namespace under "args"; allowing that one plain
    # attribute container keeps weights_only=True (no code runs) and reads timm checkpoints.
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's own message advises weights_only=False ("will likely succeed"): never pass that on.
        needs = re.findall(r"GLOBAL ([\w.]+)", str(exc))
        what = f" (it needs {needs[0]})" if needs else ""
        raise RegistryError(
            f"refused to load {path} for safety: it holds pickled objects other than tensors{what}, and "
            f"unpickling them could run arbitrary code, so ensembler never does. Re-save the weights as a "
            f"plain state_dict (torch.save(model.state_dict(), FILE)) or as .safetensors on a machine you trust."
        ) from None
    except Exception as exc:  # noqa: BLE001 - corrupt zip, truncated file, ...
        reason = "truncated or corrupted" if isinstance(exc, (RuntimeError, EOFError)) else type(exc).__name__
        raise RegistryError(f"cannot read checkpoint {path}: not a readable PyTorch checkpoint ({reason})") from None


def _refuse_non_torch_file(path: Path) -> None:
    """A file torch.save did not write (a text file, an npz, an empty file) named like a checkpoint:
    say so, before torch's unpickler turns it into a misleading error."""
    with open(path, "rb") as fh:
        head = fh.read(64)
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # torch.save's zip, or its legacy pickle
        return
    if not head:
        kind = "it is empty"
    elif all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        first = head.splitlines()[0][:24].decode("ascii")
        kind = f"it is a text file (it starts {first!r})"
    else:
        kind = f"it starts with the bytes {head[:8]!r}"
    raise RegistryError(f"{path} is not a PyTorch checkpoint: {kind}; expected a file written by torch.save "
                        f"(a state dict) or a .safetensors file")


def _non_tensor_keys(obj) -> list[str]:
    import torch

    return [str(k) for k, v in obj.items() if not torch.is_tensor(v)] if isinstance(obj, Mapping) else []


def _no_state_dict_message(path: Path, obj: Mapping) -> str:
    """Why ``obj`` holds no state dict, naming the keys that hold something other than a tensor."""
    for key in _PLAIN_KEYS + _EMA_KEYS:  # a wrapper whose state dict holds a non-tensor
        inner = obj.get(key)
        bad = _non_tensor_keys(inner)
        if isinstance(inner, Mapping) and inner and bad:
            return (f"{path}: {key!r} is not a state dict of tensors: key {bad[0]!r} holds a "
                    f"{type(inner[bad[0]]).__name__}, not a tensor" + _more(bad))
    bad = _non_tensor_keys(obj)
    if bad and len(bad) < len(obj):  # mostly tensors: a state dict with a stray value
        return (f"{path} holds no state dict: key {bad[0]!r} holds a {type(obj[bad[0]]).__name__}, "
                f"not a tensor" + _more(bad))
    return (f"{path} holds no state dict: expected a dict of tensors or one under "
            f"{', '.join(_PLAIN_KEYS + _EMA_KEYS)}; found keys {sorted(map(str, obj))[:12]}")


def _more(bad: list[str]) -> str:
    return f" (also {', '.join(map(repr, bad[1:6]))})" if len(bad) > 1 else ""


def _is_tensor_dict(obj) -> bool:
    import torch

    return isinstance(obj, Mapping) and len(obj) > 0 and all(torch.is_tensor(v) for v in obj.values())


def _strip_prefixes(state_dict: dict) -> tuple[dict, list[str]]:
    """Strip wrapper prefixes that *every* key carries (repeatedly: ``module._orig_mod.``)."""
    stripped = []
    changed = True
    while changed and state_dict:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state_dict):
                state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
                stripped.append(prefix)
                changed = True
    return state_dict, stripped


@dataclass
class OutsideCheckpoint:
    """A state dict read from an outside file and how it was found in it."""

    state_dict: dict
    path: str
    key: str | None          # "state_dict", "state_dict_ema", ... or None for a bare state dict
    ema: bool
    stripped_prefixes: list[str]

    def describe(self) -> dict:
        return {"path": self.path, "key": self.key, "ema": self.ema,
                "stripped_prefixes": self.stripped_prefixes}


def read_outside_checkpoint(path, *, use_ema: bool | None = None) -> OutsideCheckpoint:
    """Like :func:`load_outside_state_dict`, also saying which key and prefixes were used."""
    path = Path(path)
    suffix = checkpoint_suffix(path)
    if suffix not in CHECKPOINT_SUFFIXES:
        raise RegistryError(
            f"cannot import {path}: unknown checkpoint suffix {suffix or '(none)'!r}; "
            f"expected one of {', '.join(CHECKPOINT_SUFFIXES)}"
        )
    if not path.is_file():
        raise RegistryError(f"checkpoint file not found: {path}")
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj = load_file(str(path), device="cpu")
        except Exception as exc:  # noqa: BLE001 - SafetensorError and OSError
            raise RegistryError(f"cannot read safetensors file {path}: {exc}") from exc
    else:
        obj = _torch_load_weights_only(path)

    key: str | None = None
    if _is_tensor_dict(obj):
        state_dict = dict(obj)
    elif isinstance(obj, Mapping):
        plain = [k for k in _PLAIN_KEYS if _is_tensor_dict(obj.get(k))]
        ema = [k for k in _EMA_KEYS if _is_tensor_dict(obj.get(k))]
        if not plain and not ema:
            raise RegistryError(_no_state_dict_message(path, obj))
        if plain and ema and use_ema is None:
            raise RegistryError(
                f"{path} holds both EMA ({ema[0]}) and non-EMA ({plain[0]}) weights; choose one "
                f"with --ema or --no-ema (use_ema=True/False)"
            )
        if use_ema is True and not ema:
            raise RegistryError(f"--ema was asked for, but {path} holds no EMA weights (only {plain[0]})")
        if use_ema is False and not plain:
            raise RegistryError(f"--no-ema was asked for, but {path} holds only EMA weights ({ema[0]})")
        key = ema[0] if (use_ema or not plain) else plain[0]
        state_dict = dict(obj[key])
    else:
        raise RegistryError(f"{path} holds a {type(obj).__name__}, not a state dict")

    state_dict, stripped = _strip_prefixes(state_dict)
    check_finite(state_dict, str(path))
    return OutsideCheckpoint(state_dict, str(path), key, key in _EMA_KEYS, stripped)


def load_outside_state_dict(path, *, use_ema: bool | None = None) -> dict:
    """Read a state dict from an outside checkpoint file, safely.

    Parameters
    ----------
    path : path
        ``.pth``, ``.pth.tar``, ``.pt``, ``.bin``, ``.ckpt`` (read with
        ``torch.load(path, map_location="cpu", weights_only=True)``, never full unpickling)
        or ``.safetensors``.
    use_ema : bool, optional
        For files holding both EMA (``state_dict_ema``/``model_ema``) and plain
        (``state_dict``/``model``) weights this must be given; otherwise whichever exists is used.

    Returns
    -------
    dict of str to torch.Tensor
        Keys with the ``module.``, ``_orig_mod.`` and ``model.`` prefixes that every key
        carries stripped.

    Raises
    ------
    RegistryError
        Unknown suffix, missing file, a pickle that needs code to run (refused), no state
        dict found, an ambiguous EMA choice, or NaN/inf values.

    Examples
    --------
    >>> sd = load_outside_state_dict("best.pth", use_ema=False)  # doctest: +SKIP
    """
    return read_outside_checkpoint(path, use_ema=use_ema).state_dict


__all__ = ["CHECKPOINT_SUFFIXES", "HEADS", "WRAPPER_PREFIXES", "OutsideCheckpoint", "StateDictCheck",
    "as_label_space", "check_arch", "check_finite", "check_head", "checkpoint_suffix", "check_state_dict",
    "compare_state_dict", "create_model", "expected_state_shapes", "head_blocks", "head_num_outputs", "joint_log_probs",
    "joint_logits", "load_outside_state_dict", "read_outside_checkpoint"]
