"""`ensembler tune-weights`: tune an ensemble on OOF logits, print the evidence, write a Recipe.

Parsing and printing only; the work (members, tuning, charts, the recipe written last) is one
call, :func:`ensembler.ensemble.tune_recipe`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..names import TUNING_METHODS, TUNING_METRICS
from ._common import add_registry_arg, console, err_console


def register(sub) -> None:
    """Add ``tune-weights`` to the top-level parser."""
    p = sub.add_parser(
        "tune-weights",
        help="fit temperatures, weights and class biases on OOF logits; write a recipe",
        description="Tune ensemble weights on out-of-fold logits (Caruana selection or scipy on the simplex), "
        "optionally with per-member temperatures and per-class biases; print every member, the hard vote, the "
        "uniform soft vote and the tuned blend in-sample and honestly (each fold held out of the tuning), "
        "and write the recipe JSON that `ensembler predict --recipe` applies.",
    )
    p.add_argument("--members", default=None, metavar="all|NAMES",
                   help="comma-separated registry families/checkpoint ids/OOF file stems; 'a+b+c' composes "
                        "per-factor members into the joint space (default: the --oof files, else all families)")
    add_registry_arg(p)
    p.add_argument("--oof", nargs="+", action="extend", default=[], metavar="FILE",
                   help="raw OOF .npz files (ids, logits, labels, folds), each a member named by its file stem")
    p.add_argument("--method", choices=TUNING_METHODS, default="caruana",
                   help="caruana: greedy selection with replacement; scipy: simplex weights minimising log-loss; "
                        "stack: multinomial logistic regression on the members' log-probabilities, C by inner CV")
    p.add_argument("--metric", choices=TUNING_METRICS, default="f1",
                   help="metric Caruana selects for, class biases maximise and the honest score reports")
    p.add_argument("--rounds", type=int, default=50, help="Caruana rounds (default 50)")
    p.add_argument("--temperature", action=argparse.BooleanOptionalAction, default=True,
                   help="fit one temperature per member before blending (default on)")
    p.add_argument("--class-bias", action="store_true", help="tune per-class biases on the blend for macro-F1")
    p.add_argument("--no-honest", dest="honest", action="store_false",
                   help="skip the nested-CV honest score (faster; the table then shows in-sample only)")
    p.add_argument("--out", default="recipe.json", metavar="FILE", help="recipe JSON to write (default recipe.json)")
    p.add_argument("--plots", default=None, metavar="DIR",
                   help="folder for weights.png and per_class_f1.png (default: <out stem>_plots next to the recipe)")
    p.add_argument("--no-plots", dest="make_plots", action="store_false", help="do not write PNG charts")
    p.add_argument("--overwrite", action="store_true", help="replace an existing recipe (and its charts)")
    p.set_defaults(func=tune_weights_command)


def _fmt(x, digits=4):
    return "–" if x is None else f"{x:.{digits}f}"


def tune_weights_command(args) -> int:
    from ..ensemble import tune_recipe

    plots = (Path(args.plots) if args.plots else True) if args.make_plots else False
    status = err_console().status("tuning...")
    with status:
        run = tune_recipe(args.members, out=args.out, registry=args.registry, oof_files=args.oof, plots=plots,
                          method=args.method, metric=args.metric, rounds=args.rounds, temperature=args.temperature,
                          class_bias=args.class_bias, honest=args.honest, overwrite=args.overwrite,
                          progress=lambda msg: status.update(msg))
    _print_table(run.result, args)
    con = console()
    con.print(f"recipe: [bold]{run.recipe_path}[/] (hash {run.result.recipe.hash()[:12]})")
    for name, path in run.plots.items():
        con.print(f"{name} chart: {path}")
    return 0


def _print_table(result, args) -> None:
    from rich.markup import escape
    from rich.table import Table

    r = result.recipe
    title = (f"tune-weights: {(result.tuned_recipe or r).method}, metric {r.metric}, "
             f"{len(r.members)} members, {r.scores.get('rows')} OOF rows" + (", temperatures" if args.temperature and args.method != "stack" else "")
             + (", class biases" if (result.tuned_recipe or r).class_biases is not None else ""))
    table = Table(title=title, title_justify="left")
    honest_col = f"honest {r.metric} (folds)"
    for col, just in (("member / blend", "left"), ("F1", "right"), ("acc", "right"), ("logloss", "right"),
                      (honest_col, "right"), ("weight", "right"), ("T", "right"), ("NLL→T", "right"),
                      ("ECE→T", "right"), ("ships", "left"), ("note", "left")):
        # Names and numbers never wrap (a squeezed name column printed nothing); notes wrap.
        table.add_column(col, justify=just, no_wrap=col != "note", min_width=len(col) if col != "note" else None)
    for row in result.rows:
        style = {"tuned": "bold", "honest": "bold green"}.get(row["kind"])
        nll = f"{_fmt(row['nll_before'], 3)}→{_fmt(row['nll_after'], 3)}" if row["nll_before"] is not None else ""
        ece = f"{_fmt(row['ece_before'], 3)}→{_fmt(row['ece_after'], 3)}" if row["ece_before"] is not None else ""
        note = row["note"] or ""
        if row["tie_rate"] is not None:
            note = f"ties {row['tie_rate']:.1%} → smallest class"
        honest = ""
        if row.get("honest_mean") is not None:
            honest = _fmt(row["honest_mean"]) + (f" ± {row['honest_sd']:.4f}" if row.get("honest_sd") is not None else "")
        temp = ""
        if row["temperature"] is not None:
            temp = _fmt(row["temperature"], 2) + (" (bound)" if row.get("t_at_bound") else "")
        table.add_row(escape(row["name"]), _fmt(row["f1"]), _fmt(row["acc"]), _fmt(row["logloss"]), honest,
                      _fmt(row["weight"], 3) if row["weight"] is not None else "", temp, nll, ece,
                      "◀ ships" if row.get("ships") else "", escape(note), style=style)
    con = console()
    con.print(table)
    if result.honest is not None:
        folds = ", ".join(f"{k}: {v:.4f}" for k, v in result.honest["per_fold"].items())
        con.print(f"tuned blend: honest {r.metric} per held-out fold {folds} (mean {result.honest['mean']:.4f}); "
                  f"in-sample {result.in_sample[r.metric]:.4f}", highlight=False)
    tuned = result.tuned_recipe or r
    if tuned.class_biases is not None:
        con.print("class biases (tuned): " + ", ".join(f"{c}={b:+.1f}" for c, b in zip(tuned.classes, tuned.class_biases)
                                                       if b), highlight=False, markup=False)
    if result.decision is not None:
        con.print(f"[bold]ships:[/] {escape(result.decision.reason)}", highlight=False)
    t = result.timings
    con.print(f"time: tuning {t['tune_s']:.2f} s, honest {t['honest_s']:.2f} s, baselines {t['baselines_s']:.2f} s",
              style="dim")
