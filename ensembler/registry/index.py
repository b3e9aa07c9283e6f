"""The checkpoint registry: what every ensemble is built from.

A registry is a folder (``--registry PATH``, else ``$ENSEMBLER_REGISTRY``, else
``./checkpoints``) holding ``registry.json`` (``{"version": 1, "entries": [...]}``) and one
``weights.safetensors`` per checkpoint under ``<family>/fold<k>/`` (``<family>/single/`` for
a checkpoint without a fold).

Rules that keep it trustworthy:

- weights are safetensors (no pickle); every load recomputes the sha256 recorded in the
  entry and checks that tensors are finite;
- ``registry.json`` is rewritten atomically (temp file, fsync, ``os.replace``) and every
  read-modify-write of it happens while holding ``registry.json.lock``, so concurrent
  writers lose nothing and a crash leaves the old index or the new one;
- outside checkpoints are imported through :func:`ensembler.models.read_outside_checkpoint`
  (``weights_only=True``, never full unpickling) and checked key by key against the
  declared architecture and head;
- keys of an entry this version does not know are kept when the index is rewritten.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from ._io import atomic_path, sha256_file, write_json_atomic
from .errors import EnsemblerError, IntegrityError, RegistryError
from .labels import LabelSpace
from .preprocess import Preprocess

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

INDEX_NAME = "registry.json"
INDEX_VERSION = 1
WEIGHTS_NAME = "weights.safetensors"
ENV_VAR = "ENSEMBLER_REGISTRY"
DEFAULT_ROOT = "checkpoints"

# Family names and ids become folder names: keep them to one portable path component.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
# Entry fields that identify the stored weights; update() refuses to change them.
_FROZEN_FIELDS = ("id", "sha256", "weights", "created")


@dataclass
class Entry:
    """One checkpoint of the registry.

    Attributes
    ----------
    id : str
        Unique name, ``<family>-fold<k>`` by default (``<family>`` without a fold).
    family : str
        The training run; its fold checkpoints' validation folds cover the training set once.
    fold : int or None
    arch : str
        timm architecture.
    head : {"flat", "factored"}
    label_space : dict
        ``LabelSpace.to_dict()`` of what the model predicts (a factor's space for ``target``).
    preprocess : dict
        ``Preprocess.to_dict()``.
    sha256 : str
        Of the weights file.
    weights : str
        Weights path relative to the registry root.
    metrics : dict
        Validation metrics (e.g. ``{"val_macro_f1": 0.81}``).
    oof : str or None
        OOF logits path relative to the registry root.
    target : str or None
        Factor name for a per-factor model (e.g. ``"age"``).
    train_config : dict
        How it was trained (or where it was imported from, under ``"import"``).
    versions : dict
        torch, timm, ensembler versions that wrote it.
    created : str
        ISO 8601 time (UTC).
    model_kwargs : dict
        Extra ``timm.create_model`` arguments the weights need (e.g. ``img_size`` of a ViT).
    extra : dict
        Keys of the stored entry this version does not know; written back unchanged.
    """

    id: str
    family: str
    fold: int | None
    arch: str
    head: str
    label_space: dict
    preprocess: dict
    sha256: str
    weights: str
    metrics: dict = field(default_factory=dict)
    oof: str | None = None
    target: str | None = None
    train_config: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    created: str = ""
    model_kwargs: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict, repr=False)

    @property
    def labels(self) -> LabelSpace:
        return LabelSpace.from_dict(self.label_space)

    @property
    def pre(self) -> Preprocess:
        return Preprocess.from_dict(self.preprocess)

    @property
    def num_classes(self) -> int:
        return len(self.label_space["classes"])

    @property
    def num_outputs(self) -> int:
        from .models import head_num_outputs

        return head_num_outputs(self.labels, self.head)

    @property
    def val_macro_f1(self) -> float | None:
        """The validation macro-F1 under whichever name the producer used, if any."""
        for key in ("val_macro_f1", "macro_f1", "val_f1", "f1"):
            value = self.metrics.get(key)
            if isinstance(value, (int, float)):
                return float(value)
        return None

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        d.update({k: v for k, v in self.extra.items() if k not in d})
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Entry":
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        missing = sorted(required - set(d))
        if missing:
            raise RegistryError(f"registry entry {d.get('id', '?')!r} lacks fields {missing}")
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        return cls(**known, extra=extra)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _versions() -> dict[str, str]:
    import safetensors
    import timm
    import torch

    from . import __version__

    return {"torch": torch.__version__, "timm": timm.__version__, "ensembler": __version__,
            "safetensors": safetensors.__version__}


def _check_name(value: str, what: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise RegistryError(
            f"{what} {value!r} must start with a letter or digit and contain only letters, "
            f"digits, '.', '_', '+', '-' (it becomes a folder/file name)"
        )
    return value


def default_entry_id(family: str, fold: int | None) -> str:
    return family if fold is None else f"{family}-fold{fold}"


def resolve_root(root: str | os.PathLike | None = None) -> Path:
    """``root``, else ``$ENSEMBLER_REGISTRY``, else ``./checkpoints``."""
    if root is not None and str(root) != "":
        return Path(root)
    env = os.environ.get(ENV_VAR, "").strip()
    return Path(env) if env else Path(DEFAULT_ROOT)


class Registry:
    """A folder of verified checkpoints and their ``registry.json`` index.

    Parameters
    ----------
    root : path, optional
        Registry folder; default ``$ENSEMBLER_REGISTRY`` or ``./checkpoints``. Nothing is
        created until the first write.

    Examples
    --------
    >>> import timm
    >>> from ensembler import LabelSpace, Preprocess
    >>> reg = Registry("checkpoints")                                        # doctest: +SKIP
    >>> ls = LabelSpace(("cat", "dog"))
    >>> m = timm.create_model("test_resnet", num_classes=2)
    >>> e = reg.add(m, family="r", fold=0, arch="test_resnet", head="flat", label_space=ls,
    ...             preprocess=Preprocess.from_timm("test_resnet", 32))       # doctest: +SKIP
    >>> reg.load_model(e.id)                                                 # doctest: +SKIP
    """

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = resolve_root(root)

    def __repr__(self) -> str:
        return f"Registry({str(self.root)!r})"

    # ------------------------------------------------------------------ index I/O
    @property
    def index_path(self) -> Path:
        return self.root / INDEX_NAME

    @property
    def lock_path(self) -> Path:
        return self.root / (INDEX_NAME + ".lock")

    @contextlib.contextmanager
    def _locked(self):
        from filelock import FileLock

        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.lock_path)):
            yield

    def _read_raw(self) -> list[dict]:
        """The stored entries as dicts (unknown keys kept); [] when there is no index yet."""
        import json

        path = self.index_path
        if not path.exists():
            return []
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise RegistryError(f"cannot read registry index {path}: {exc}") from exc
        if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
            raise RegistryError(f"registry index {path} is not {{'version': 1, 'entries': [...]}}")
        version = data.get("version", 1)
        if not isinstance(version, int) or version > INDEX_VERSION:
            raise RegistryError(
                f"registry index {path} has version {version!r}; this ensembler reads version "
                f"{INDEX_VERSION} (upgrade ensembler)"
            )
        return [dict(e) for e in data["entries"]]

    def _write_raw(self, raw: list[dict]) -> None:
        write_json_atomic(self.index_path, {"version": INDEX_VERSION, "entries": raw})

    # ------------------------------------------------------------------ queries
    def entries(self) -> list[Entry]:
        """All entries, in insertion order."""
        return [Entry.from_dict(d) for d in self._read_raw()]

    def ids(self) -> list[str]:
        return [d.get("id") for d in self._read_raw()]

    def __len__(self) -> int:
        return len(self._read_raw())

    def __contains__(self, entry_id: str) -> bool:
        return entry_id in self.ids()

    def get(self, entry_id: str | Entry) -> Entry:
        """The entry called ``entry_id``; RegistryError naming close ids when there is none."""
        if isinstance(entry_id, Entry):
            return entry_id
        entries = self.entries()
        for e in entries:
            if e.id == entry_id:
                return e
        raise RegistryError(self._unknown_message(entry_id, [e.id for e in entries]))

    def _unknown_message(self, name: str, known: Sequence[str]) -> str:
        close = difflib.get_close_matches(str(name), list(known), n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        where = f"registry {self.root}"
        if not known:
            return f"no entry {name!r}: {where} is empty{hint}"
        return f"no entry or family {name!r} in {where}{hint} (see `ensembler registry list`)"

    def family(self, name: str) -> list[Entry]:
        """Entries of family ``name`` sorted by fold; RegistryError when there are none."""
        members = [e for e in self.entries() if e.family == name]
        if not members:
            raise RegistryError(self._unknown_message(name, self.families()))
        return sorted(members, key=lambda e: (e.fold is None, e.fold if e.fold is not None else 0, e.id))

    def families(self) -> list[str]:
        """Family names in order of first appearance."""
        seen: dict[str, None] = {}
        for e in self.entries():
            seen.setdefault(e.family, None)
        return list(seen)

    def resolve(self, names: str | Iterable[str] | None) -> list[Entry]:
        """Entries named by ``names``: ``"all"`` (or None), or entry ids and family names
        (a list or a comma-separated string). Duplicates are dropped, order kept."""
        entries = self.entries()
        if names is None or (isinstance(names, str) and names.strip() == "all"):
            if not entries:
                raise RegistryError(f"registry {self.root} is empty")
            return entries
        if isinstance(names, str):
            names = [n.strip() for n in names.split(",") if n.strip()]
        names = list(names)
        if not names:
            raise RegistryError("no registry members named")
        by_id = {e.id: e for e in entries}
        out: dict[str, Entry] = {}
        for name in names:
            if name == "all":
                out.update((e.id, e) for e in entries)
            elif name in by_id:
                out.setdefault(name, by_id[name])
            else:
                members = [e for e in entries if e.family == name]
                if not members:
                    known = list(by_id) + sorted({e.family for e in entries})
                    raise RegistryError(self._unknown_message(name, known))
                for e in sorted(members, key=lambda e: (e.fold is None, e.fold or 0, e.id)):
                    out.setdefault(e.id, e)
        return list(out.values())

    def path(self, rel: str | os.PathLike) -> Path:
        """Absolute-or-root-relative path of a file the registry records relative to its root."""
        return self.root / rel

    def family_dir(self, family: str) -> Path:
        return self.root / _check_name(family, "family")

    # ------------------------------------------------------------------ writes
    def add(self, model_or_state_dict, *, family: str, fold: int | None, arch: str, head: str,
            label_space, preprocess=None, metrics: dict | None = None, oof: str | None = None,
            target: str | None = None, train_config: dict | None = None,
            entry_id: str | None = None, overwrite: bool = False,
            model_kwargs: dict | None = None, check: bool = True) -> Entry:
        """Save weights as safetensors and add their entry to the index.

        Parameters
        ----------
        model_or_state_dict : torch.nn.Module or dict of tensors
        family, fold : str, int or None
            Weights go to ``<root>/<family>/fold<fold>/weights.safetensors``
            (``<family>/single/`` when fold is None).
        arch, head, label_space : str, {"flat", "factored"}, LabelSpace or dict
        preprocess : Preprocess or dict, optional
            Default: ``Preprocess.from_timm(arch)``.
        metrics, oof, target, train_config : optional
            Validation metrics, OOF logits path (relative to the root), factor name of a
            per-factor model, training configuration.
        entry_id : str, optional
            Default ``<family>-fold<fold>`` (``<family>`` without a fold).
        overwrite : bool
            Replace an entry with the same id instead of raising RegistryError.
        model_kwargs : dict, optional
            Extra ``create_model`` arguments the weights need. Default: ``{"img_size": (H, W)}``
            for fixed-input-size architectures (ViT, Swin) stored at a non-default size.
        check : bool
            Check keys and shapes against ``arch``/``head`` before writing (default True).

        Returns
        -------
        Entry
        """
        import torch

        from .models import _as_label_space, _check_head, check_arch, check_finite, check_state_dict

        _check_name(family, "family")
        if fold is not None:
            if isinstance(fold, bool) or not isinstance(fold, int) or fold < 0:
                raise RegistryError(f"fold must be a non-negative int or None, got {fold!r}")
        entry_id = _check_name(entry_id or default_entry_id(family, fold), "entry id")
        ls = _as_label_space(label_space)
        _check_head(head, ls)
        check_arch(arch)
        if preprocess is None:
            pre = Preprocess.from_timm(arch)
        elif isinstance(preprocess, Preprocess):
            pre = preprocess
        elif isinstance(preprocess, Mapping):
            pre = Preprocess.from_dict(dict(preprocess))
        else:
            raise RegistryError(f"preprocess must be a Preprocess or dict, got {type(preprocess).__name__}")
        if model_kwargs is None:
            model_kwargs = _default_model_kwargs(arch, pre)

        if isinstance(model_or_state_dict, torch.nn.Module):
            state = model_or_state_dict.state_dict()
        elif isinstance(model_or_state_dict, Mapping):
            state = dict(model_or_state_dict)
        else:
            raise RegistryError(
                f"add() takes a torch module or a state dict, got {type(model_or_state_dict).__name__}")
        bad = [k for k, v in state.items() if not torch.is_tensor(v)]
        if bad:
            raise RegistryError(f"state dict for {entry_id!r} has non-tensor values under {bad[:8]}")
        # Own, contiguous CPU copies: safetensors refuses shared storage (tied weights).
        state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}
        check_finite(state, f"weights of {entry_id!r}")
        if check:
            check_state_dict(state, arch, label_space=ls, head=head, source=f"weights of {entry_id!r}",
                             model_kwargs=model_kwargs)

        entry = Entry(
            id=entry_id, family=family, fold=fold, arch=arch, head=head, label_space=ls.to_dict(),
            preprocess=pre.to_dict(), sha256="", weights="", metrics=dict(metrics or {}), oof=oof,
            target=target, train_config=dict(train_config or {}), versions=_versions(),
            created=_now(), model_kwargs=dict(model_kwargs),
        )
        from safetensors.torch import save_file

        metadata = {"format": "pt", "ensembler_id": entry_id, "arch": arch, "head": head}
        with self._locked():
            raw = self._read_raw()
            old = next((d for d in raw if d.get("id") == entry_id), None)
            if old is not None and not overwrite:
                raise RegistryError(
                    f"registry {self.root} already has an entry {entry_id!r}; pass overwrite=True "
                    f"(or remove it first) to replace it")
            rel = self._weights_rel(family, fold, entry_id, raw)
            target_path = self.root / rel
            with atomic_path(target_path) as tmp:
                save_file(state, str(tmp), metadata=metadata)
            entry.weights = rel
            entry.sha256 = sha256_file(target_path)
            if old is not None:
                # An overwritten entry keeps the unknown keys a newer version stored in it.
                entry.extra = {k: v for k, v in old.items() if k not in entry.to_dict()}
                raw = [entry.to_dict() if d.get("id") == entry_id else d for d in raw]
            else:
                raw.append(entry.to_dict())
            self._write_raw(raw)
            if old is not None and old.get("weights") and old.get("weights") != rel:
                self._delete_unreferenced(old["weights"], raw)
        return entry

    def _weights_rel(self, family: str, fold: int | None, entry_id: str, raw: list[dict]) -> str:
        folder = f"{family}/{'single' if fold is None else f'fold{fold}'}"
        rel = f"{folder}/{WEIGHTS_NAME}"
        owners = {d.get("id") for d in raw if d.get("weights") == rel}
        if owners - {entry_id}:
            # Another entry (e.g. a per-factor model of the same family/fold) owns the default
            # file; never overwrite its weights.
            rel = f"{folder}/{entry_id}.safetensors"
        return rel

    def update(self, entry_id: str, **fields) -> Entry:
        """Change fields of an entry (metrics, oof, train_config, ...); returns the new entry.

        ``id``, ``sha256``, ``weights`` and ``created`` identify the stored weights and
        cannot be changed. Names that are not Entry fields (e.g. ``onnx={...}`` recorded by
        the ONNX exporter) are stored as extra keys of the entry and kept on every rewrite.
        """
        import json

        frozen = sorted(set(fields) & set(_FROZEN_FIELDS + ("extra",)))
        if frozen:
            raise RegistryError(
                f"cannot update {frozen} of entry {entry_id!r}: they identify its stored weights")
        if "label_space" in fields and isinstance(fields["label_space"], LabelSpace):
            fields["label_space"] = fields["label_space"].to_dict()
        if "preprocess" in fields and isinstance(fields["preprocess"], Preprocess):
            fields["preprocess"] = fields["preprocess"].to_dict()
        for name, value in fields.items():
            try:
                json.dumps(value, default=_json_value)
            except TypeError as exc:
                raise RegistryError(f"cannot store {name}={value!r} in entry {entry_id!r}: {exc}") from exc
        with self._locked():
            raw = self._read_raw()
            for i, d in enumerate(raw):
                if d.get("id") == entry_id:
                    new = dict(d)
                    new.update(fields)
                    entry = Entry.from_dict(new)
                    raw[i] = entry.to_dict()
                    self._write_raw(raw)
                    return entry
        raise RegistryError(self._unknown_message(entry_id, [d.get("id") for d in raw]))

    def remove(self, entry_id: str) -> None:
        """Remove an entry and its weights file (and its OOF file when no other entry uses it)."""
        with self._locked():
            raw = self._read_raw()
            old = next((d for d in raw if d.get("id") == entry_id), None)
            if old is None:
                raise RegistryError(self._unknown_message(entry_id, [d.get("id") for d in raw]))
            raw = [d for d in raw if d.get("id") != entry_id]
            self._write_raw(raw)
            # Files go only after the index no longer points at them: a crash in between
            # leaves an orphan file, never an entry without weights.
            for key in ("weights", "oof"):
                if old.get(key):
                    self._delete_unreferenced(old[key], raw)

    def _delete_unreferenced(self, rel: str, raw: list[dict]) -> None:
        if any(d.get("weights") == rel or d.get("oof") == rel for d in raw):
            return
        path = (self.root / rel)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        # Drop folders this left empty, up to (not including) the root.
        folder = path.parent
        root = self.root.resolve()
        while folder.resolve() != root and root in folder.resolve().parents:
            try:
                folder.rmdir()
            except OSError:
                break
            folder = folder.parent

    # ------------------------------------------------------------------ loading
    def load_state_dict(self, entry: Entry | str) -> dict:
        """The entry's weights, after checking the sha256 and that every tensor is finite.

        Raises
        ------
        IntegrityError
            Missing file, sha256 different from the entry's (both hashes named), an
            unparseable file or NaN/inf values; the message names the file.
        """
        from safetensors.torch import load_file

        from .models import check_finite

        entry = self.get(entry)
        path = self.path(entry.weights)
        if not path.is_file():
            raise IntegrityError(f"weights file of {entry.id!r} is missing: {path}")
        digest = sha256_file(path)
        if digest != entry.sha256:
            raise IntegrityError(
                f"weights file {path} of {entry.id!r} was modified: sha256 {digest} != recorded "
                f"{entry.sha256}")
        try:
            state = load_file(str(path), device="cpu")
        except Exception as exc:  # noqa: BLE001 - SafetensorError
            raise IntegrityError(f"weights file {path} of {entry.id!r} is not valid safetensors: {exc}") from exc
        check_finite(state, f"weights file {path} of {entry.id!r}", error=IntegrityError)
        return state

    def build_model(self, entry: Entry | str) -> "nn.Module":
        """The entry's architecture with its head, randomly initialised (pretrained=False)."""
        from .models import create_model

        entry = self.get(entry)
        return create_model(entry.arch, label_space=entry.labels, head=entry.head, pretrained=False,
                            **entry.model_kwargs)

    def load_model(self, entry_or_id: Entry | str, device="cpu") -> "nn.Module":
        """Build the entry's timm model (``pretrained=False``), load its verified weights
        strictly, move it to ``device`` and return it in eval mode."""
        from .models import compare_state_dict

        entry = self.get(entry_or_id)
        state = self.load_state_dict(entry)
        model = self.build_model(entry)
        diff = compare_state_dict(state, {k: tuple(v.shape) for k, v in model.state_dict().items()})
        if not diff.ok:
            raise IntegrityError(
                f"weights file {self.path(entry.weights)} of {entry.id!r} does not match {entry.arch} "
                f"with a {entry.head} head: {diff.describe()}")
        model.load_state_dict(state, strict=True)
        return model.to(device).eval()

    # ------------------------------------------------------------------ verification
    def verify_entry(self, entry: Entry | str) -> list[str]:
        """Problems of one entry (each names its file); [] when it is sound."""
        from .models import _meta_state_shapes, compare_state_dict

        entry = self.get(entry)
        problems = []
        if entry.oof and not self.path(entry.oof).is_file():
            problems.append(f"OOF logits file of {entry.id!r} is missing: {self.path(entry.oof)}")
        try:
            state = self.load_state_dict(entry)
        except IntegrityError as exc:
            return problems + [str(exc)]
        try:
            expected = _meta_state_shapes(entry.arch, entry.labels, entry.head, entry.model_kwargs)
        except EnsemblerError as exc:
            return problems + [f"{self.path(entry.weights)} of {entry.id!r}: {exc}"]
        diff = compare_state_dict(state, expected)
        if not diff.ok:
            problems.append(f"weights file {self.path(entry.weights)} of {entry.id!r} does not match "
                            f"{entry.arch} with a {entry.head} head: {diff.describe()}")
        return problems

    def verify(self, ids: Iterable[str] | None = None) -> list[tuple[str, str]]:
        """Check every entry (or those in ``ids``): file exists, sha256, safetensors parses,
        tensors finite, keys and shapes match the arch/head, and its OOF file (if any) exists.

        Returns
        -------
        list of (entry id, problem)
            Empty when everything is sound. Each problem names the file.
        """
        entries = self.entries() if ids is None else [self.get(i) for i in ids]
        return [(e.id, problem) for e in entries for problem in self.verify_entry(e)]

    # ------------------------------------------------------------------ import
    def import_checkpoint(self, path, *, arch: str, num_classes: int | None = None, label_space=None,
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
        from .models import _meta_state_shapes, check_state_dict, read_outside_checkpoint

        from .models import check_arch

        path = Path(path)
        check_arch(arch)
        ls = _label_space_for_import(num_classes, label_space)
        if family is None:
            family = _family_from_path(path)
        pre = Preprocess.from_timm(arch, img_size)
        model_kwargs = _default_model_kwargs(arch, pre)
        outside = read_outside_checkpoint(path, use_ema=use_ema)
        import torch

        expected = _meta_state_shapes(arch, ls, head, model_kwargs)
        state, dropped = _select_model_keys(outside.state_dict, expected)
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
        return self.add(state, family=family, fold=fold, arch=arch, head=head, label_space=ls,
                        preprocess=pre, metrics=metrics, target=target,
                        train_config={"import": info}, entry_id=entry_id, overwrite=overwrite,
                        model_kwargs=model_kwargs, check=False)


def _select_model_keys(state: dict, expected: Mapping[str, tuple]) -> tuple[dict, list[str]]:
    """A Lightning module's state dict holds the network under ``model.`` next to other
    modules (``criterion.weight``, ``ema.*``, metric buffers). When stripping one wrapper
    prefix from the keys that carry it gives exactly the architecture's keys, keep those and
    report the rest as dropped; otherwise return ``state`` unchanged (the key check will list
    every difference)."""
    from .models import _WRAPPER_PREFIXES

    if set(state) == set(expected):
        return state, []
    for prefix in _WRAPPER_PREFIXES:
        inner = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        core = {k for k in expected if not k.endswith("num_batches_tracked")}
        if inner and core <= set(inner) <= set(expected):
            return inner, sorted(k for k in state if not k.startswith(prefix))
    return state, []


def _json_value(obj):
    # What _io.write_json_atomic also accepts (numpy scalars and arrays, paths).
    import numpy as np

    if isinstance(obj, (np.integer, np.floating, np.ndarray, Path)):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _default_model_kwargs(arch: str, pre: Preprocess) -> dict:
    """``img_size`` for fixed-input-size archs (ViT, Swin) whose size differs from timm's default:
    their position embeddings are sized by it, so loading needs the same value."""
    if not pre.fixed_input_size:
        return {}
    default = Preprocess.from_timm(arch)
    if tuple(default.input_size) == tuple(pre.input_size):
        return {}
    return {"img_size": list(pre.input_size)}


def _label_space_for_import(num_classes, label_space) -> LabelSpace:
    if label_space is not None:
        if isinstance(label_space, LabelSpace):
            ls = label_space
        elif isinstance(label_space, Mapping):
            ls = LabelSpace.from_dict(dict(label_space))
        else:
            ls = LabelSpace(tuple(str(c) for c in label_space))
        if num_classes is not None and int(num_classes) != ls.num_classes:
            raise RegistryError(
                f"--num-classes {num_classes} disagrees with the {ls.num_classes} classes given")
        return ls
    if num_classes is None:
        raise RegistryError("importing a checkpoint needs --num-classes N or --classes a,b,c")
    if isinstance(num_classes, bool) or int(num_classes) < 2:
        raise RegistryError(f"--num-classes must be an integer >= 2, got {num_classes!r}")
    return LabelSpace(tuple(str(i) for i in range(int(num_classes))))


def _family_from_path(path: Path) -> str:
    from .models import _suffix

    stem = path.name[: -len(_suffix(path))] if _suffix(path) else path.stem
    name = re.sub(r"[^A-Za-z0-9._+-]+", "-", stem).strip("-._+") or "imported"
    return name


__all__ = ["Entry", "Registry", "default_entry_id", "resolve_root"]
