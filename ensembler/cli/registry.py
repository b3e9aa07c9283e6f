"""`ensembler registry list|show|import|verify|remove`: the checkpoint registry.

Handlers parse and print; the work is :class:`ensembler.registry.Registry`.
"""

from __future__ import annotations

import argparse
import json

from ..errors import EnsemblerError
from ..names import HEADS
from ._common import add_group, add_registry_arg, console, err_console


def register(sub) -> None:
    """Add ``registry list/show/import/verify/remove`` to the top-level parser."""
    _, cmds = add_group(sub, "registry", "list, inspect, import, verify and remove checkpoints")

    p = cmds.add_parser("list", help="table of every checkpoint", description="Table of every checkpoint.")
    add_registry_arg(p)
    p.add_argument("--family", default=None, help="only this family")
    p.set_defaults(func=cmd_list)

    p = cmds.add_parser("show", help="everything about one checkpoint",
                        description="Everything the registry records about one checkpoint.")
    add_registry_arg(p)
    p.add_argument("id", help="entry id")
    p.add_argument("--json", action="store_true", help="print the raw entry as JSON")
    p.set_defaults(func=cmd_show)

    p = cmds.add_parser(
        "import", help="import an outside .pth/.pt/.bin/.ckpt/.safetensors checkpoint",
        description="Import an outside checkpoint. Pickled files are read with "
                    "torch.load(weights_only=True) only; anything needing code to unpickle is refused. "
                    "Keys and shapes are checked against --arch and --head.")
    add_registry_arg(p)
    p.add_argument("path", help="checkpoint file")
    p.add_argument("--arch", required=True, help="timm architecture of the weights")
    classes = p.add_mutually_exclusive_group(required=True)
    classes.add_argument("--num-classes", type=int, default=None, metavar="N", help="N classes named 0..N-1")
    classes.add_argument("--classes", default=None, metavar="A,B,C", help="comma-separated class names")
    classes.add_argument("--label-space", default=None, metavar="mask|JSON",
                         help="'mask' (18 classes, factored) or a JSON file of LabelSpace.to_dict()")
    p.add_argument("--age-bands", default=None, metavar="LO,HI", help="with --label-space mask (default 30,60)")
    p.add_argument("--family", default=None, help="family name (default: the file name)")
    p.add_argument("--fold", type=int, default=None, help="fold index")
    p.add_argument("--id", dest="entry_id", default=None, help="entry id (default: FAMILY-foldK or FAMILY)")
    p.add_argument("--img-size", default=None, metavar="S|H,W", help="input size (default: the arch's)")
    p.add_argument("--head", choices=HEADS, default="flat")
    p.add_argument("--target", default=None, metavar="FACTOR", help="factor predicted by a per-factor model")
    ema = p.add_mutually_exclusive_group()
    ema.add_argument("--ema", dest="use_ema", action="store_true", default=None, help="use the EMA weights")
    ema.add_argument("--no-ema", dest="use_ema", action="store_false", help="use the non-EMA weights")
    p.add_argument("--overwrite", action="store_true", help="replace an entry with the same id")
    p.set_defaults(func=cmd_import)

    p = cmds.add_parser("verify", help="check sha256, finiteness and shapes of checkpoints",
                        description="Check that every (or each given) entry's fields are well formed, its "
                                    "paths lie inside the registry, its arch exists, its weights file matches "
                                    "its sha256, parses, is finite and fits its arch/head, and its OOF file "
                                    "reads. Exits 1 on any problem, naming each failing file and field.")
    add_registry_arg(p)
    p.add_argument("ids", nargs="*", help="entry ids (default: all)")
    p.set_defaults(func=cmd_verify)

    p = cmds.add_parser("remove", help="remove a checkpoint and its weights",
                        description="Remove an entry and its weights file.")
    add_registry_arg(p)
    p.add_argument("id", help="entry id")
    p.set_defaults(func=cmd_remove)


def _registry(args):
    from ..registry import Registry

    return Registry(args.registry)


def _fmt_size(pre: dict) -> str:
    size = pre.get("input_size") or []
    return "x".join(str(s) for s in size) if size else "?"


def _entry_bands(entry):
    """Age bands an entry's classes depend on (None: not a mask model, or not one that predicts age)."""
    from ..ensemble import entry_label_space
    from ..labels import age_bands_of

    try:
        return age_bands_of(entry_label_space(entry))
    except (KeyError, TypeError, ValueError):
        return None


def cmd_list(args: argparse.Namespace) -> int:
    from rich.table import Table

    reg = _registry(args)
    entries = reg.entries()
    if args.family is not None:
        entries = reg.family(args.family)
    if not entries:
        console().print(f"registry {reg.root} has no entries")
        return 0
    table = Table(title=f"registry {reg.root} ({len(entries)} checkpoints)")
    for col, just in (("id", "left"), ("family", "left"), ("fold", "right"), ("arch", "left"),
                      ("target", "left"), ("head", "left"), ("loss", "left"), ("age bands", "left"),
                      ("k", "right"), ("split seed", "right"), ("input", "right"), ("classes", "right"),
                      ("val macro-F1", "right"), ("sha256", "left")):
        # Ids, archs and hashes are copied into other commands: fold them, never cut them.
        table.add_column(col, justify=just, overflow="fold")
    for e in entries:
        f1 = e.val_macro_f1
        tc = e.train_config or {}
        bands = _entry_bands(e)
        table.add_row(e.id, e.family, "-" if e.fold is None else str(e.fold), e.arch, e.target or "all",
                      e.head, str(tc.get("loss", "-")), "-" if bands is None else f"{bands[0]},{bands[1]}",
                      str(tc.get("k", "-")), str(tc.get("seed", "-")), _fmt_size(e.preprocess), str(e.num_classes),
                      "-" if f1 is None else f"{f1:.4f}", e.sha256[:12])
    console().print(table)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from rich.pretty import Pretty
    from rich.table import Table

    reg = _registry(args)
    entry = reg.get(args.id)
    data = entry.to_dict()
    if args.json:
        console().print_json(json.dumps(data))
        return 0
    table = Table(title=f"{entry.id}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    data = {"weights file": str(reg.path(entry.weights)), **data}
    if entry.oof:
        data["oof file"] = str(reg.path(entry.oof))
    ls = entry.label_space
    data["label_space"] = {"num_classes": len(ls["classes"]), **ls}
    for key, value in data.items():
        table.add_row(key, Pretty(value) if isinstance(value, (dict, list)) else str(value))
    console().print(table)
    return 0


def _read_label_space_json(path: str):
    """A LabelSpace JSON file (``LabelSpace.to_dict()``): an object whose ``classes`` is a list of
    names, optional ``factors`` [{"name", "classes"}] and ``meta``; anything else names the file."""
    from ..labels import LabelSpace

    hint = 'a JSON object like {"classes": ["cat", "dog"]} (LabelSpace.to_dict())'
    try:
        with open(path, encoding="utf-8") as fh:
            d = json.load(fh)
    except (OSError, ValueError) as exc:
        raise EnsemblerError(f"--label-space {path}: not 'mask' or a readable JSON file ({exc})") from None
    classes = d.get("classes") if isinstance(d, dict) else None
    if not isinstance(classes, list) or not all(isinstance(c, (str, int)) and not isinstance(c, bool)
                                                for c in classes):
        raise EnsemblerError(f"--label-space {path}: expected {hint}, got {json.dumps(d)[:80]}")
    factors = d.get("factors", [])
    if not isinstance(factors, list) or not all(isinstance(f, dict) and isinstance(f.get("name"), str)
                                                and isinstance(f.get("classes"), list) for f in factors):
        raise EnsemblerError(f"--label-space {path}: 'factors' must be a list of {{\"name\", \"classes\"}} objects")
    if not isinstance(d.get("meta", {}), dict):
        raise EnsemblerError(f"--label-space {path}: 'meta' must be an object")
    try:
        return LabelSpace.from_dict(d)
    except (ValueError, TypeError, KeyError) as exc:
        raise EnsemblerError(f"--label-space {path}: {exc}") from None


def cmd_import(args: argparse.Namespace) -> int:
    from ._common import parse_int_list
    from ..labels import LabelSpace

    label_space = None
    if args.classes is not None:
        label_space = [c.strip() for c in args.classes.split(",") if c.strip()]
    elif args.label_space is not None:
        if args.label_space == "mask":
            bands = parse_int_list(args.age_bands, "--age-bands") or (30, 60)
            label_space = LabelSpace.mask(bands)
        else:
            label_space = _read_label_space_json(args.label_space)
    img_size = parse_int_list(args.img_size, "--img-size")
    if img_size is not None:
        img_size = img_size[0] if len(img_size) == 1 else tuple(img_size)
    reg = _registry(args)
    entry = reg.import_checkpoint(
        args.path, arch=args.arch, num_classes=args.num_classes, label_space=label_space,
        family=args.family, fold=args.fold, img_size=img_size, head=args.head, use_ema=args.use_ema,
        entry_id=args.entry_id, overwrite=args.overwrite, target=args.target)
    src = entry.train_config.get("import", {})
    which = f"{src.get('key') or 'bare state dict'}" + (" (EMA)" if src.get("ema") else "")
    console().print(
        f"imported [bold]{entry.id}[/]: {entry.arch}, {entry.head} head, {entry.num_classes} classes, "
        f"input {_fmt_size(entry.preprocess)}, from {which} -> {reg.path(entry.weights)} "
        f"(sha256 {entry.sha256[:12]})", highlight=False, soft_wrap=True)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    reg = _registry(args)
    entries = reg.verify_items(args.ids or None)  # malformed entries too: each is reported, none stops it
    if not entries:
        console().print(f"registry {reg.root} has no entries")
        return 0
    problems: list[tuple[str, str]] = []
    with Progress(console=err_console(), transient=True, disable=len(entries) < 4) as progress:
        task = progress.add_task("verifying", total=len(entries))
        for label, stored in entries:
            problems += [(label, p) for p in reg.verify_entry(stored)]
            progress.advance(task)
    if problems:
        for entry_id, problem in problems:
            err_console().print(f"[bold red]FAIL[/] {entry_id}: {problem}", highlight=False, soft_wrap=True)
        bad = len({i for i, _ in problems})
        err_console().print(f"{bad} of {len(entries)} checkpoints failed verification")
        return 1
    console().print(f"all {len(entries)} checkpoints verified (fields, paths, sha256, finite, shapes, OOF) "
                    f"in {reg.root}", highlight=False, soft_wrap=True)
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    reg = _registry(args)
    removed = reg.remove(args.id)  # refuses an entry whose files resolve outside the registry
    files = f" and {reg.path(removed['weights'])}" if isinstance(removed.get("weights"), str) else ""
    console().print(f"removed {args.id}{files}", highlight=False, soft_wrap=True)
    return 0
