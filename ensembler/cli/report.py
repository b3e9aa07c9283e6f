"""`ensembler report`: one self-contained HTML page about the members and the blend.

Parsing and printing only; the work is :func:`ensembler.report.build_report`.
"""

from __future__ import annotations

from ._common import add_data_args, add_engine_args, add_registry_arg, console, default_workers


def register(sub) -> None:
    """Add ``report`` to the top-level parser."""
    p = sub.add_parser(
        "report", help="one self-contained HTML page: leaderboard, heatmaps, calibration, TTA, curves, ledger",
        description="Write one HTML file (inline CSS, images embedded, no script or font from the network; "
                    "readable on a phone) from the registry's OOF logits and training curves, a recipe, tta-report "
                    "files and the submission ledger. With --data the blend is also run over those images (cached "
                    "logits reused) and, when they are labeled, scored on them.")
    add_registry_arg(p)
    p.add_argument("--recipe", default=None, metavar="FILE",
                   help="recipe JSON from tune-weights (default: the uniform soft vote of every family)")
    p.add_argument("--tta-report", dest="tta_reports", nargs="+", default=[], metavar="FILE",
                   help="OOF-TTA .npz files written by `ensembler tta-report` (per-view deltas)")
    add_data_args(p, required=False)
    p.add_argument("--ledger", default=None, metavar="JSONL",
                   help="submission ledger (default <registry>/../submissions/ledger.jsonl)")
    add_engine_args(p)
    p.add_argument("--out", required=True, metavar="HTML", help="file to write, e.g. report.html")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_report)


def cmd_report(args) -> int:
    from ..report import build_report

    table = None
    if args.data:
        from ..data import load_source_from_args

        table = load_source_from_args(args)
    res = build_report(args.registry, recipe=args.recipe, tta_reports=args.tta_reports, data=table,
                       ledger=args.ledger, out=args.out, tta=args.tta, merge=args.merge, backend=args.backend,
                       batch_size=args.batch_size, workers=default_workers() if args.workers is None else args.workers,
                       device=args.device, cache_dir=args.cache_dir, overwrite=args.overwrite,
                       progress=True)
    con = console()
    for note in res.notes:
        con.print(f"note: {note}", markup=False, highlight=False, style="yellow")
    con.print(f"wrote {res.path} ({res.path.stat().st_size / 1e3:.0f} kB, {res.figures} figures, "
              f"{len(res.sections)} sections: {', '.join(res.sections)}) in {res.seconds:.1f} s",
              markup=False, highlight=False)
    return 0
