"""`ensembler export-onnx`, `ensembler infer` and `ensembler tta-report`.

ONNX export with parity, raw member logits, and TTA judged on out-of-fold data. Handlers parse
and print; the work is :mod:`ensembler.infer` (``export_onnx``, ``predict_members``,
``tta_report``) and :func:`ensembler.logits.write_logits`. Voting and submissions are
``ensembler predict``.
"""

from __future__ import annotations

from ..errors import EnsemblerError
from ._common import (add_data_args, add_engine_args, add_executor_args, add_registry_arg, console, default_workers,
                      executor_for)


def register(sub) -> None:
    """Add ``export-onnx``, ``infer`` and ``tta-report`` to the top-level parser."""
    p = sub.add_parser(
        "export-onnx", help="export a checkpoint to ONNX and check parity with torch",
        description="Write model.onnx next to a checkpoint's weights (dynamic batch axis), record its sha256, "
                    "and compare onnxruntime with torch on a random batch. Prints the max abs difference; "
                    "exits non-zero (and writes nothing) above --atol.")
    add_registry_arg(p)
    p.add_argument("id", help="registry entry id")
    p.add_argument("--opset", type=int, default=None, metavar="N", help="ONNX opset (default 17)")
    p.add_argument("--atol", type=float, default=1e-4, help="parity tolerance, max abs difference (default 1e-4)")
    p.set_defaults(func=cmd_export_onnx)

    p = sub.add_parser(
        "infer", help="run registry members over data and write their raw logits",
        description="Run members (families are averaged over their folds) with a TTA plan and write raw "
                    "member logits (npz + json sidecar) for later voting. Logits are cached per checkpoint; "
                    "a repeated run with the same key does no forward pass.")
    add_data_args(p)
    add_registry_arg(p)
    p.add_argument("--members", default="all", metavar="all|NAMES",
                   help="'all', or comma-separated family names / checkpoint ids (default all)")
    add_engine_args(p, amp=True)
    p.add_argument("--compile", action="store_true", help="torch.compile each model")
    p.add_argument("--out", required=True, metavar="PATH",
                   help="output .npz, every member's logits side by side (its .json sidecar is written beside it)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file (and its sidecar)")
    add_executor_args(p.add_argument_group("where it runs (rows sharded across Ray workers)"), unit="worker")
    p.set_defaults(func=cmd_infer)

    p = sub.add_parser(
        "tta-report", help="judge a TTA plan on a family's out-of-fold data, view by view",
        description="Run each fold checkpoint of a family over its own validation rows (from the family's "
                    "oof.npz) with every view of a TTA plan, and print macro-F1, accuracy and log-loss for no "
                    "TTA, each view alone and the merged plan, with the change against no TTA. Writes the "
                    "merged OOF-TTA logits next to oof.npz for 'tune-weights --oof FILE'.")
    add_data_args(p)
    add_registry_arg(p)
    p.add_argument("--family", required=True, metavar="NAME", help="registry family (its k fold checkpoints)")
    p.add_argument("--tta", required=True, metavar="PLAN",
                   help="TTA plan to judge: hflip, vflip, flip, d4, center-crop=S, five-crop=S, ten-crop=S, "
                        "scales=0.9,1,1.1; combine with '+'")
    p.add_argument("--merge", default="mean-logits", metavar="RULE",
                   help="merge rule of the written OOF-TTA file: mean-logits (default), mean-probs, gmean-probs, "
                        "max-probs")
    p.add_argument("--all-merges", action="store_true",
                   help="also score every merge rule on the same per-view logits (no extra forward)")
    add_engine_args(p, views=False, amp=True)
    add_executor_args(p.add_argument_group("where it runs (rows sharded across Ray workers)"), unit="worker")
    p.set_defaults(func=cmd_tta_report)


def cmd_export_onnx(args) -> int:
    from ..infer.onnx import export_onnx
    from ..registry import Registry

    if args.atol <= 0:
        raise EnsemblerError(f"--atol must be positive, got {args.atol}")
    result = export_onnx(Registry(args.registry), args.id, opset=args.opset, atol=args.atol)
    out = console()
    out.print(f"wrote {result.path} (opset {result.opset}, sha256 {result.sha256[:16]}…)", highlight=False)
    out.print(f"parity: max abs diff {result.max_abs_diff:.3g} <= atol {result.atol:g}", highlight=False)
    return 0


def cmd_infer(args) -> int:
    from rich.table import Table

    from ..data import load_source_from_args
    from ..infer import predict_members
    from .._io import refuse_existing
    from ..logits import sidecar_path, write_logits
    from ..registry import Registry

    if not str(args.out).endswith(".npz"):
        raise EnsemblerError(f"--out must be a .npz file, got {args.out!r}")
    refuse_existing([args.out, sidecar_path(args.out)], overwrite=args.overwrite)  # before any forward
    table = load_source_from_args(args)
    workers = default_workers() if args.workers is None else args.workers
    with executor_for(args) as executor:
        results = predict_members(
            table, args.members, Registry(args.registry), tta=args.tta, merge=args.merge, backend=args.backend,
            batch_size=args.batch_size, workers=workers, device=args.device, cache_dir=args.cache_dir,
            use_cache=args.use_cache, amp=False if args.amp == "off" else args.amp, compile=args.compile,
            progress=True, executor=executor)
    path = write_logits(args.out, results)

    t = Table(title=f"member logits over {len(table)} images · TTA {next(iter(results.values())).meta['tta']}")
    for col in ("member", "checkpoints", "classes", "views", "backend", "cached", "seconds"):
        t.add_column(col, justify="right" if col in ("classes", "views", "seconds") else "left")
    for name, m in results.items():
        t.add_row(name, str(len(m.meta["checkpoints"])), str(m.num_classes), str(m.meta["views"]),
                  f"{m.meta['backend']} {m.meta['precision']}", "yes" if m.meta["cached"] else "no",
                  f"{m.meta['seconds']:.1f}")
    out = console()
    out.print(t)
    out.print(f"wrote {path}", highlight=False)
    return 0


def _delta(value: float, higher_is_better: bool, baseline: bool) -> str:
    if baseline:
        return ""
    if abs(value) < 5e-5:
        return "[dim]±0[/]"
    better = value > 0 if higher_is_better else value < 0
    return f"[{'green' if better else 'red'}]{value:+.4f}[/]"


def cmd_tta_report(args) -> int:
    from rich.markup import escape
    from rich.table import Table

    from ..data import load_source_from_args
    from ..infer.oof_tta import tta_report
    from ..registry import Registry

    table = load_source_from_args(args)
    workers = default_workers() if args.workers is None else args.workers
    with executor_for(args) as executor:
        rep = tta_report(
            table, args.family, Registry(args.registry), tta=args.tta, merge=args.merge, all_merges=args.all_merges,
            backend=args.backend, batch_size=args.batch_size, workers=workers, device=args.device,
            cache_dir=args.cache_dir, use_cache=args.use_cache, amp=False if args.amp == "off" else args.amp,
            progress=True, executor=executor)

    t = Table(title=f"TTA on out-of-fold data · family {escape(rep.family)} · {len(rep.ids)} rows · "
                    f"plan {escape(rep.tta)} ({len(rep.views)} views)")
    for col in ("prediction", "macro-F1", "Δ F1", "accuracy", "Δ acc", "log-loss", "Δ log-loss"):
        t.add_column(col, justify="left" if col == "prediction" else "right")
    for s in rep.scores:
        base = s.kind == "baseline"
        name = escape(s.name if s.kind != "view" else f"view {s.name}")
        if s.kind == "merged":
            name = f"[bold]{name}[/]"
        t.add_row(name, f"{s.f1:.4f}", _delta(s.delta_f1, True, base), f"{s.acc:.4f}",
                  _delta(s.delta_acc, True, base), f"{s.logloss:.4f}", _delta(s.delta_logloss, False, base),
                  end_section=base)
    out = console()
    out.print(t)
    cached = rep.meta["cached_folds"]
    out.print(f"folds {sorted(rep.checkpoints)}: each checkpoint ran over its own validation rows only "
              f"({rep.meta['backend']} {rep.meta['precision']} on {rep.meta['device']}"
              + (f"; folds {cached} from the cache" if cached else "") + ")", highlight=False, markup=False)
    if rep.identity_matches:
        out.print(f"identity view = oof.npz logits (max abs diff {rep.identity_max_abs_diff:.2g})", highlight=False,
                  markup=False)
    else:
        out.print(f"[yellow]warning:[/] {escape(rep.identity_note)}", highlight=False)
    out.print(f"wrote {rep.output} (merge {rep.merge}; use it with: ensembler tune-weights --oof {rep.output})",
              highlight=False, markup=False)
    return 0
