"""`ensembler demo`: the whole pipeline on the bundled digits, with the comparison table.

Parsing and printing only; the work is :func:`ensembler.demo.run_demo`.
"""

from __future__ import annotations

from ._common import console, err_console


def register(sub) -> None:
    """Add ``demo`` to the top-level parser."""
    p = sub.add_parser(
        "demo", help="the whole pipeline on the bundled digits: train, tune, predict, compare (no download)",
        description="Hold out ~20% of scikit-learn's digits, train two small architectures on 3 grouped folds of "
                    "the rest, tune ensemble weights on their OOF logits, predict the held-out part with TTA, "
                    "write a submission, and print every member next to the hard vote, the uniform soft vote and "
                    "the tuned ensemble. Its outputs in --out are replaced on every run.")
    p.add_argument("--out", default="demo_out", metavar="DIR", help="output folder (default ./demo_out)")
    p.add_argument("--quick", action="store_true", help="a smoke run: a fifth of the images, one epoch")
    p.add_argument("--epochs", type=int, default=None, help="epochs per fold (default 3; 1 with --quick)")
    p.set_defaults(func=cmd_demo)


def _fmt(x, digits=4):
    return "" if x is None else f"{x:.{digits}f}"


def cmd_demo(args) -> int:
    from rich.markup import escape
    from rich.table import Table

    from ..demo import run_demo

    err = err_console()
    res = run_demo(args.out, quick=args.quick, epochs=args.epochs, progress=True,
                   log=lambda msg: err.print(f"[bold cyan]demo:[/] {msg}", highlight=False))
    con = console()
    table = Table(title=f"digits: {res.train_rows} training images (3 grouped folds), {res.test_rows} held out; "
                        f"{res.epochs} epoch(s); TTA {res.tta}", title_justify="left")
    for col, just in (("member / ensemble", "left"), ("OOF F1", "right"), ("OOF acc", "right"),
                      ("honest F1", "right"), ("held-out F1", "right"), ("held-out acc", "right"), ("ships", "left"),
                      ("note", "left")):
        table.add_column(col, justify=just, no_wrap=col != "note")
    for r in res.rows:
        style = {"recipe": "bold green", "tuned": "bold"}.get(r["kind"])
        if r["kind"] == "recipe":
            table.add_section()
        table.add_row(escape(r["name"]), _fmt(r["oof_f1"]), _fmt(r["oof_acc"]), _fmt(r["honest_f1"]),
                      _fmt(r["test_f1"]), _fmt(r["test_acc"]), "◀ ships" if r.get("ships") else "",
                      escape(r["note"] or "") if r["kind"] != "recipe" else "", style=style)
    con.print(table)
    con.print(f"[bold]ships:[/] {escape(res.recipe.scores['ships']['reason'])}", highlight=False)
    con.print("OOF F1 of the tuned blend is in-sample (tuned on those rows); its 'honest F1' repeats the tuning "
              "with each fold held out (untuned candidates: their OOF F1). The recipe ships the tuned blend only "
              "when its honest gain, paired over folds, beats the fold-to-fold noise. Held-out = the ~20% the "
              "models and the tuning never saw.", style="dim")
    for note in res.notes:
        con.print(f"note: {note}", highlight=False)
    if res.prediction.repeat_message():
        con.print(res.prediction.repeat_message(), style="yellow", highlight=False)
    art = Table(title="where everything went", title_justify="left", show_header=False)
    art.add_column("artifact")
    art.add_column("path", overflow="fold")
    for label, path in res.artifacts.items():
        art.add_row(label, str(path))
    con.print(art)
    t = res.timings
    con.print(f"time: data {t['data']:.1f} s, training {t['train']:.1f} s, tuning {t['tune']:.1f} s, "
              f"prediction {t['predict']:.1f} s, total {t['total']:.1f} s", style="dim")
    con.print(f"next: ensembler predict --data {res.artifacts['held-out manifest']} --registry "
              f"{res.artifacts['registry']} --recipe {res.artifacts['recipe']} --tta {res.tta} --out my.csv",
              highlight=False, style="dim")
    return 0
