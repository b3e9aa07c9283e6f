"""``registry verify``: everything ``predict`` and ``tune-weights`` will read from one entry, checked.

The fields and paths of the stored entry (:mod:`.checks`), that its architecture exists and its
head fits its label space, that its weights file matches its sha256, parses, is finite and fits
the architecture (:func:`.weights.weights_problems`), and that its OOF file reads as OOF logits
(ids, logits, labels, folds).
"""

from __future__ import annotations

from ..errors import EnsemblerError
from .checks import entry_name, entry_problems
from .entry import Entry
from .weights import weights_problems


def entry_faults(registry, d) -> list[str]:
    """Problems of the stored entry ``d`` of ``registry``; each names the file, the entry and the field."""
    from ..heads import check_head
    from ..logits import read_logits_set
    from ..models import check_arch

    problems = entry_problems(d, registry.root, registry.index_path)
    if problems:
        return problems  # nothing deeper is safe to read
    entry = Entry.from_dict(d)
    try:
        check_arch(entry.arch)
        check_head(entry.head, entry.labels)
    except EnsemblerError as exc:
        return [f"{registry.index_path}: {entry_name(d)}: {exc}"]
    if entry.oof and not registry.path(entry.oof).is_file():
        problems.append(f"OOF logits file of {entry.id!r} is missing: {registry.path(entry.oof)}")
    elif entry.oof:
        try:
            read_logits_set(registry.path(entry.oof), require=("labels", "folds"))
        except EnsemblerError as exc:
            problems.append(f"OOF logits file of {entry.id!r}: {exc}")
    return problems + weights_problems(entry, registry.path(entry.weights))
