"""The registry index: ``registry.json`` under its lock, and every query and change of it.

:class:`Registry` is the one object the rest of ensembler holds; weights I/O lives in
:mod:`.weights` and the import of outside checkpoints in :mod:`.outside`.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

from .._io import sha256_file, write_json_atomic
from ..errors import EnsemblerError, IntegrityError, RegistryError
from ..labels import LabelSpace
from ..logits import sidecar_path
from ..names import member_names
from ..preprocess import Preprocess
from .checks import check_entry, check_storable, entry_name, inside_root, path_problems
from .entry import FROZEN_FIELDS, INDEX_NAME, INDEX_VERSION, Entry, check_name, resolve_root
from .outside import import_checkpoint
from .verify import entry_faults
from .weights import model_with_weights, new_entry, read_weights, weights_problems, weights_rel, write_weights
from .weights import build_model as _build_model

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


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

    def _read_raw(self, strict: bool = True) -> list[dict]:
        """The stored entries as dicts (unknown keys kept); [] when there is no index yet.
        ``strict``: an entry that is not an object is an error naming it (else returned as is)."""
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
        for i, e in enumerate(data["entries"]):
            if strict and not isinstance(e, dict):
                raise RegistryError(f"{path}: entries[{i}] is a {type(e).__name__} ({e!r:.60}), not an entry "
                                    f"object (see `ensembler registry verify`)")
        return [dict(e) if isinstance(e, dict) else e for e in data["entries"]]

    def _write_raw(self, raw: list[dict]) -> None:
        write_json_atomic(self.index_path, {"version": INDEX_VERSION, "entries": raw})

    # ------------------------------------------------------------------ queries
    def entries(self) -> list[Entry]:
        """All entries, in insertion order, each checked first (:func:`.checks.check_entry`).

        Raises
        ------
        RegistryError
            An entry with a malformed field, a path outside the root or a loader argument off the
            allowlist, naming ``registry.json``, the entry and the field.
        """
        raw = self._read_raw()
        for i, d in enumerate(raw):
            check_entry(d, self.root, self.index_path, i)
        return [Entry.from_dict(d) for d in raw]

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

    def member_names(self, names: str | Iterable[str]) -> list[str]:
        """Ensemble member names in order: ``"all"`` becomes every family; commas split a string.

        The rule of :func:`ensembler.names.member_names` (names are not looked up here; a
        composition ``a+b+c`` stays one name; a name given twice, or nothing at all, is a
        :class:`~ensembler.errors.ParameterError`); ``"all"`` of an empty registry is an
        :class:`EnsemblerError`.
        """
        def every_family() -> list[str]:
            fams = self.families()
            if not fams:
                raise EnsemblerError(f"the registry {self.root} holds no checkpoints ('all' is empty)")
            return fams

        return member_names(names, all_names=every_family)

    def members(self, names) -> list[tuple[str, list[Entry]]]:
        """``[(member name, [checkpoint entries])]`` for ensemble members, in the order asked.

        ``names`` as :meth:`member_names` takes them, or :class:`Entry` objects (each stands
        for itself). A family name gives its fold checkpoints (a family member is the mean over
        them); a checkpoint id gives that checkpoint alone; an unknown name is a
        :class:`RegistryError` naming close matches.
        """
        if isinstance(names, Entry):
            names = [names]
        if isinstance(names, str) or not any(isinstance(n, Entry) for n in names):
            items: list = self.member_names(names)
        else:
            items = list(names)
        families = set(self.families())
        out: dict[str, list[Entry]] = {}
        for item in items:
            if isinstance(item, Entry):
                out.setdefault(item.id, [item])
            elif item in families:
                out.setdefault(item, self.family(item))
            else:
                out.setdefault(item, self.resolve([item]))
        return list(out.items())

    def path(self, rel: str | os.PathLike) -> Path:
        """Absolute-or-root-relative path of a file the registry records relative to its root."""
        return self.root / rel

    def family_dir(self, family: str) -> Path:
        return self.root / check_name(family, "family")

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
        entry, state = new_entry(
            model_or_state_dict, family=family, fold=fold, arch=arch, head=head, label_space=label_space,
            preprocess=preprocess, metrics=metrics, oof=oof, target=target, train_config=train_config,
            entry_id=entry_id, model_kwargs=model_kwargs, check=check)
        with self._locked():
            raw = self._read_raw()
            old = self._replaced(raw, entry.id, overwrite)
            rel = weights_rel(family, fold, entry.id, raw)
            entry.weights = rel
            entry.sha256 = write_weights(self.root / rel, state, entry)
            raw = self._put(raw, entry, old)
            if old is not None and old.get("weights") and old.get("weights") != rel:
                self._delete_unreferenced(old["weights"], raw)
        return entry

    def stage(self, model_or_state_dict, *, family: str, fold: int | None, arch: str, head: str,
              label_space, preprocess=None, metrics: dict | None = None, target: str | None = None,
              train_config: dict | None = None, entry_id: str | None = None) -> Entry:
        """Write the weights where :meth:`add` would, and return their entry *without* recording it.

        A worker (another process or machine that sees the registry folder) trains and calls
        this; the driver alone changes the index, with :meth:`record`. Until then the file is
        an orphan: no reader sees it. Arguments as :meth:`add`.
        """
        entry, state = new_entry(
            model_or_state_dict, family=family, fold=fold, arch=arch, head=head, label_space=label_space,
            preprocess=preprocess, metrics=metrics, target=target, train_config=train_config, entry_id=entry_id)
        rel = weights_rel(family, fold, entry.id, self._read_raw())
        entry.weights = rel
        entry.sha256 = write_weights(self.root / rel, state, entry)
        return entry

    def record(self, entry: Entry, *, overwrite: bool = False) -> Entry:
        """Add an entry whose weights :meth:`stage` wrote, after checking the file's sha256.

        Raises
        ------
        IntegrityError
            The weights file is missing or differs from the staged one (named).
        RegistryError
            An entry with that id exists and ``overwrite`` is False.
        """
        check_entry(entry.to_dict(), self.root, f"entry to record in {self.index_path}", finite=False)
        path = self.root / entry.weights
        with self._locked():
            if not path.is_file():
                raise IntegrityError(f"weights file of {entry.id!r} is missing: {path}")
            digest = sha256_file(path)
            if digest != entry.sha256:
                raise IntegrityError(f"weights file {path} of {entry.id!r} changed after it was written: "
                                     f"sha256 {digest} != {entry.sha256}")
            raw = self._read_raw()
            old = self._replaced(raw, entry.id, overwrite)
            raw = self._put(raw, entry, old)
            if old is not None and old.get("weights") and old.get("weights") != entry.weights:
                self._delete_unreferenced(old["weights"], raw)
        return entry

    def _replaced(self, raw: list[dict], entry_id: str, overwrite: bool) -> dict | None:
        """The stored entry ``entry_id`` replaces (None); RegistryError when it exists and not ``overwrite``."""
        old = next((d for d in raw if d.get("id") == entry_id), None)
        if old is not None and not overwrite:
            raise RegistryError(f"registry {self.root} already has an entry {entry_id!r}; pass overwrite=True "
                                f"(or remove it first) to replace it")
        return old

    def _put(self, raw: list[dict], entry: Entry, old: dict | None) -> list[dict]:
        """Write the index with ``entry`` in place of ``old`` (whose unknown keys it keeps) or appended."""
        if old is not None:
            kept = {k: v for k, v in old.items() if k not in entry.to_dict()}
            entry.extra = {**kept, **entry.extra}
            raw = [entry.to_dict() if d.get("id") == entry.id else d for d in raw]
        else:
            raw = raw + [entry.to_dict()]
        self._write_raw(raw)
        return raw

    def update(self, entry_id: str, **fields) -> Entry:
        """Change fields of an entry (metrics, oof, train_config, ...); returns the new entry.

        ``id``, ``sha256``, ``weights`` and ``created`` identify the stored weights and
        cannot be changed. Names that are not Entry fields (e.g. ``onnx={...}`` recorded by
        the ONNX exporter) are stored as extra keys of the entry and kept on every rewrite.
        """
        frozen = sorted(set(fields) & set(FROZEN_FIELDS + ("extra",)))
        if frozen:
            raise RegistryError(
                f"cannot update {frozen} of entry {entry_id!r}: they identify its stored weights")
        if "label_space" in fields and isinstance(fields["label_space"], LabelSpace):
            fields["label_space"] = fields["label_space"].to_dict()
        if "preprocess" in fields and isinstance(fields["preprocess"], Preprocess):
            fields["preprocess"] = fields["preprocess"].to_dict()
        check_storable(fields, entry_id)
        with self._locked():
            raw = self._read_raw()
            for i, d in enumerate(raw):
                if d.get("id") == entry_id:
                    new = dict(d)
                    new.update(fields)
                    check_entry(new, self.root, f"update of {self.index_path}", finite=False)
                    entry = Entry.from_dict(new)
                    raw[i] = entry.to_dict()
                    self._write_raw(raw)
                    return entry
        raise RegistryError(self._unknown_message(entry_id, [d.get("id") for d in raw]))

    def remove(self, entry_id: str) -> dict:
        """Remove an entry and its weights file (and its OOF file when no other entry uses it).

        Returns the removed entry as stored. An entry whose ``weights``/``oof`` resolves outside
        the root is refused (RegistryError naming it and the field): nothing outside is deleted.
        """
        with self._locked():
            raw = self._read_raw()
            old = next((d for d in raw if d.get("id") == entry_id), None)
            if old is None:
                raise RegistryError(self._unknown_message(entry_id, [d.get("id") for d in raw]))
            escapes = path_problems({k: v for k, v in old.items() if k in ("weights", "oof") and v}, self.root)
            if escapes:
                raise RegistryError(f"{self.index_path}: {entry_name(old)}: {escapes[0]}; nothing was removed "
                                    f"(fix or delete the entry in {self.index_path} by hand)")
            raw = [d for d in raw if d.get("id") != entry_id]
            self._write_raw(raw)
            # Files go only after the index no longer points at them: a crash in between
            # leaves an orphan file, never an entry without weights.
            for key in ("weights", "oof"):
                if old.get(key):
                    self._delete_unreferenced(old[key], raw, logits=key == "oof")
        return old

    def _delete_unreferenced(self, rel: str, raw: list[dict], logits: bool = False) -> None:
        if any(d.get("weights") == rel or d.get("oof") == rel for d in raw):
            return
        try:
            inside_root(self.root, rel)
        except ValueError:
            return  # never delete a file outside the registry (an older entry pointing out of it)
        path = (self.root / rel)
        for file in (path, sidecar_path(path)) if logits else (path,):  # a logits file goes with its sidecar
            with contextlib.suppress(FileNotFoundError):
                file.unlink()
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
        entry = self.get(entry)
        return read_weights(self.path(entry.weights), entry)

    def build_model(self, entry: Entry | str) -> "nn.Module":
        """The entry's architecture with its head, randomly initialised (pretrained=False)."""
        return _build_model(self.get(entry))

    def load_model(self, entry_or_id: Entry | str, device="cpu") -> "nn.Module":
        """Build the entry's timm model (``pretrained=False``), load its verified weights
        strictly, move it to ``device`` and return it in eval mode."""
        entry = self.get(entry_or_id)
        return model_with_weights(entry, self.path(entry.weights), device)

    # ------------------------------------------------------------------ verification
    def verify_items(self, ids: Iterable[str] | None = None) -> list[tuple[str, object]]:
        """``[(label, stored entry)]`` to verify: every entry (malformed ones too), or those in ``ids``."""
        raw = self._read_raw(strict=False)
        items = [(d["id"] if isinstance(d, dict) and isinstance(d.get("id"), str) else f"entries[{i}]", d)
                 for i, d in enumerate(raw)]
        if ids is None:
            return items
        known = {label: d for label, d in items}
        for i in ids:
            if i not in known:
                raise RegistryError(self._unknown_message(i, list(known)))
        return [(i, known[i]) for i in ids]

    def verify_entry(self, entry) -> list[str]:
        """Problems of one entry (an Entry, an id or a stored dict), each naming its file and field;
        [] when it is sound and holds everything ``predict`` and ``tune-weights`` read
        (:func:`.verify.entry_faults`)."""
        if isinstance(entry, str):
            found = dict(self.verify_items([entry]))
            entry = found[entry]
        return entry_faults(self, entry.to_dict() if isinstance(entry, Entry) else entry)

    def verify(self, ids: Iterable[str] | None = None) -> list[tuple[str, str]]:
        """Check every entry (or those in ``ids``): its fields and paths (as :meth:`entries` does),
        arch and head, file exists, sha256, safetensors parses, tensors finite, keys and shapes
        match the arch/head, and its OOF file (if any) reads as OOF logits.

        Returns
        -------
        list of (entry id, problem)
            Empty when everything is sound. Each problem names the file (and the field).
        """
        return [(label, problem) for label, d in self.verify_items(ids) for problem in self.verify_entry(d)]

    # ------------------------------------------------------------------ import
    def import_checkpoint(self, path, *, arch: str, num_classes: int | None = None, label_space=None,
                          family: str | None = None, fold: int | None = None,
                          img_size: int | Sequence[int] | None = None, head: str = "flat",
                          use_ema: bool | None = None, entry_id: str | None = None,
                          overwrite: bool = False, metrics: dict | None = None,
                          target: str | None = None) -> Entry:
        """Import an outside checkpoint after checking it against ``arch`` and ``head``
        (see :func:`ensembler.registry.outside.import_checkpoint` for every argument)."""
        return import_checkpoint(self, path, arch=arch, num_classes=num_classes, label_space=label_space,
                                 family=family, fold=fold, img_size=img_size, head=head, use_ema=use_ema,
                                 entry_id=entry_id, overwrite=overwrite, metrics=metrics, target=target)

