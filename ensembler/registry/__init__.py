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
- keys of an entry this version does not know are kept when the index is rewritten;
- every entry read from ``registry.json`` is checked first (:mod:`.checks`): each field's type
  and form, no NaN/inf, ``weights``/``oof`` resolving (symlinks followed) inside the root, and
  ``model_kwargs`` only from an allowlist; a refusal names the index, the entry and the field.

Modules, one job each: :mod:`.entry` (the Entry record, names, the root), :mod:`.index`
(``registry.json``, its lock, queries and changes: :class:`Registry`), :mod:`.weights`
(safetensors I/O and checks), :mod:`.outside` (import of outside checkpoints), :mod:`.checks`
(what an entry of the index must be), :mod:`.verify` (``registry verify`` of one entry).
"""

from .entry import DEFAULT_ROOT, ENV_VAR, INDEX_NAME, INDEX_VERSION, WEIGHTS_NAME, Entry, default_entry_id, resolve_root
from .index import Registry

__all__ = ["DEFAULT_ROOT", "ENV_VAR", "INDEX_NAME", "INDEX_VERSION", "WEIGHTS_NAME", "Entry", "Registry",
           "default_entry_id", "resolve_root"]
