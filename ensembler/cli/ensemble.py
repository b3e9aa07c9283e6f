"""`ensembler tune-weights`: tune an ensemble on OOF logits, print the evidence, write a Recipe.

Parsing and printing only; the work (members, tuning, charts, the recipe written last) is one
call, :func:`ensembler.ensemble.tune_recipe`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import EnsemblerError
from ..names import TUNING_METHODS, TUNING_METRICS
from ._common import add_data_args, add_engine_args, add_registry_arg, console, default_workers, err_console


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
    p.add_argument("--tta", default=None, metavar="PLAN",
                   help="choose TTA views per family on OOF data: every view of PLAN of every family is a candidate "
                        "member (<family>@<view>), run by each fold checkpoint over its own validation rows (needs "
                        "--data, the training data; cached); the recipe keeps the chosen views and predict runs only "
                        "those")
    add_data_args(p, required=False)
    add_engine_args(p, views=False)
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
    views = None
    members, oof_files = args.members, args.oof
    if args.tta is not None:
        from .._io import refuse_existing

        refuse_existing(Path(args.out), overwrite=args.overwrite)  # before any forward
        views = _view_members(args)
        members, oof_files = views[0], ()
    status = err_console().status("tuning...")
    with status:
        run = tune_recipe(members, out=args.out, registry=args.registry, oof_files=oof_files, plots=plots,
                          method=args.method, metric=args.metric, rounds=args.rounds, temperature=args.temperature,
                          class_bias=args.class_bias, honest=args.honest, overwrite=args.overwrite,
                          progress=lambda msg: status.update(msg))
    _print_table(run.result, args)
    _print_diversity(run.result)
    if views is not None:
        _print_views(run.result, views, args)
    con = console()
    con.print(f"recipe: [bold]{run.recipe_path}[/] (hash {run.result.recipe.hash()[:12]})")
    for name, path in run.plots.items():
        con.print(f"{name} chart: {path}")
    return 0


def _view_members(args):
    """``(per-view members, merged members, plan)`` of the families, for ``--tta``."""
    from ..data import load_source_from_args
    from ..registry import Registry
    from ..view_select import view_members

    if args.oof:
        raise EnsemblerError("--tta chooses views of registry families; it cannot be combined with --oof files")
    if not args.data:
        raise EnsemblerError("--tta runs each fold checkpoint over its own validation images: give --data, the "
                             "data the families were trained on")
    from ..view_select import check_view_plan

    check_view_plan(args.tta)  # a bad or one-view plan fails before the data is read
    table = load_source_from_args(args)
    reg = Registry(args.registry)
    return view_members(table, reg.member_names(args.members or "all"), reg, tta=args.tta, backend=args.backend,
                        batch_size=args.batch_size, use_cache=args.use_cache,
                        workers=default_workers() if args.workers is None else args.workers, device=args.device,
                        cache_dir=args.cache_dir, progress=True)


def _print_views(result, views, args) -> None:
    """The views each family kept, and the honest score against every view merged."""
    from ..ensemble import align_members, tune_weights
    from ..view_select import chosen_views

    con = console()
    metric = result.recipe.metric
    plan = views[2]
    for fam, chosen in chosen_views(result.recipe).items():
        con.print(f"views chosen for {fam}: {', '.join(chosen)} (of plan {plan})", markup=False, highlight=False)
    ours = (result.recipe.scores.get("honest") or {}).get("mean")
    if ours is None or not args.honest:
        return
    allv = tune_weights(align_members(views[1]), method=args.method, metric=args.metric, rounds=args.rounds,
                        temperature=args.temperature, class_bias=args.class_bias)
    theirs = (allv.recipe.scores.get("honest") or {}).get("mean")
    if theirs is not None:
        con.print(f"honest {metric}: views chosen {ours:.4f} vs every view merged {theirs:.4f} "
                  f"({ours - theirs:+.4f})", markup=False, highlight=False)


def _print_diversity(result, limit: int = 15) -> None:
    """Pairwise disagreement and error correlation on the OOF rows, most complementary pairs first."""
    from rich.markup import escape
    from rich.table import Table

    rows = result.diversity
    if not rows:
        return
    order = sorted(rows, key=lambda r: (r["error_corr"] != r["error_corr"], r["error_corr"]))
    t = Table(title=f"diversity on OOF rows ({len(rows)} pairs" + (f", {limit} least correlated shown" if
              len(rows) > limit else "") + "): low error correlation and high disagreement make a blend pay",
              title_justify="left")
    for col in ("member A", "member B", "disagreement", "error corr", "both wrong", "error A", "error B"):
        t.add_column(col, justify="left" if col.startswith("member") else "right", no_wrap=True)
    for r in order[:limit]:
        corr = "–" if r["error_corr"] != r["error_corr"] else f"{r['error_corr']:+.3f}"
        t.add_row(escape(r["a"]), escape(r["b"]), f"{r['disagreement']:.3f}", corr, f"{r['both_wrong']:.3f}",
                  f"{r['err_a']:.3f}", f"{r['err_b']:.3f}")
    console().print(t)


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
