"""`ensembler predict` and `ensembler evaluate`: submissions with a ledger, and metrics of any logits.

Parsing and printing only; the work is :func:`ensembler.predict.predict` and
:func:`ensembler.evaluate.evaluate`.
"""

from __future__ import annotations

from .._io import refuse_existing
from ..errors import EnsemblerError
from ..names import F1_LABEL_RULES, PREDICT_BACKENDS, VOTE_RULES
from ._common import (add_data_args, add_engine_args, add_executor_args, add_registry_arg, console, default_workers,
                      err_console, executor_for, parse_float_list, print_submission, printed_warnings)


def register(sub) -> None:
    """Add ``predict`` and ``evaluate`` to the top-level parser."""
    p = sub.add_parser(
        "predict", help="run members, vote (or apply a recipe), write a submission and a ledger row",
        description="Run registry members over --data (cached logits are reused), combine them with a vote or a "
                    "tuned recipe, write the submission CSV (mask eval data: its info.csv with 'ans' filled; else "
                    "id,label,class_name) and append a row to ledger.jsonl beside it. A submission identical to an "
                    "earlier one is reported.")
    add_data_args(p)
    add_registry_arg(p)
    p.add_argument("--members", default="all", metavar="all|NAMES",
                   help="'all', or comma-separated family names / checkpoint ids; 'a+b+c' composes per-factor "
                        "members into the joint space (default all; ignored with --recipe)")
    p.add_argument("--vote", choices=VOTE_RULES, default="soft",
                   help="hard (ties to the smallest class), soft, weighted (needs --weights), gmean, logits")
    p.add_argument("--weights", default=None, metavar="W1,W2,...", help="one weight per member, in --members order")
    p.add_argument("--recipe", default=None, metavar="FILE",
                   help="recipe JSON from tune-weights: its members, temperatures, weights and class biases")
    add_engine_args(p, recipe=True, backends=PREDICT_BACKENDS)
    p.add_argument("--model", default=None, metavar="ONNX",
                   help="with --backend onnx-ensemble: the file from `ensembler export-ensemble` (it holds the "
                        "members, TTA, temperatures, weights and biases; no registry or recipe needed)")
    p.add_argument("--out", required=True, metavar="CSV", help="submission file, e.g. submissions/soft.csv")
    p.add_argument("--probs", action="store_true", help="add prob_<class> columns (not for the mask eval layout)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing submission with different content")
    add_executor_args(p.add_argument_group("where it runs (rows sharded across Ray workers)"), unit="worker")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "evaluate", help="macro-F1, accuracy, per-class table and confusion matrix of logits or an ensemble",
        description="Score a logits file (an OOF file, or `ensembler infer` output) or a recipe / members run "
                    "over labeled --data: macro-F1, accuracy, log-loss, a per-class precision/recall/F1 table and "
                    "a confusion-matrix PNG.")
    add_data_args(p, required=False)
    add_registry_arg(p)
    p.add_argument("--logits", default=None, metavar="FILE",
                   help="an .npz with ids + logits (an OOF file: its own labels are used when --data is absent) or "
                        "`ensembler infer` output (its members are combined with --vote)")
    p.add_argument("--recipe", default=None, metavar="FILE", help="run a recipe over labeled --data")
    p.add_argument("--members", default=None, metavar="all|NAMES",
                   help="without --logits: run these registry members over labeled --data and combine them with "
                        "--vote; with --logits of `ensembler infer` output: the members to use (default all)")
    p.add_argument("--vote", choices=VOTE_RULES, default="soft", help="how several members are combined (default soft)")
    p.add_argument("--weights", default=None, metavar="W1,W2,...", help="one weight per member")
    add_engine_args(p, recipe=True)
    p.add_argument("--f1-labels", choices=F1_LABEL_RULES, default="present",
                   help="classes macro-F1 averages over: present = in truth or prediction (scikit-learn's "
                        "f1_score(average='macro'), the default); all = every class, absent ones count 0")
    p.add_argument("--plot", default=None, metavar="PNG", help="write the confusion matrix there (default: none)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --plot file")
    p.set_defaults(func=cmd_evaluate)


def _load_table(args, bands=None):
    """The data; mask data without --age-bands is labelled with the members' age bands (``bands``)."""
    from ..data import detect_source, load_source_from_args

    if bands is not None and args.age_bands is None and (args.source or detect_source(args.data)) == "mask":
        err_console().print(f"[dim]age bands {bands[0]},{bands[1]}: taken from the members (--age-bands to "
                            "override)[/]", highlight=False)
        args.age_bands = f"{bands[0]},{bands[1]}"
    return load_source_from_args(args)


def cmd_predict(args) -> int:
    from rich.markup import escape
    from rich.table import Table

    from ..predict import predict

    weights = parse_float_list(args.weights, "--weights")
    if args.recipe and args.members != "all":
        err_console().print("[yellow]note:[/] --members is ignored with --recipe: the recipe decides which "
                            "models run")
    if (args.backend == "onnx-ensemble") != (args.model is not None):
        raise EnsemblerError("--backend onnx-ensemble and --model ensemble.onnx go together")
    refuse_existing(args.out, overwrite=args.overwrite)  # before the data is read
    from ..predict import member_age_bands

    # an exported ensemble carries no registry members: its labels are not read (predict only)
    bands = None if args.model is not None else member_age_bands(args.registry, args.members, args.recipe)
    table = _load_table(args, bands)
    if args.probs and (table.source or {}).get("info_csv"):
        err_console().print("[yellow]note:[/] --probs is ignored for mask eval data: its submission format is "
                            "info.csv with 'ans' filled")
    if args.model is not None:
        if args.executor != "local":
            raise EnsemblerError("--executor ray does not apply to --backend onnx-ensemble (one ONNX session here)")
        return _predict_onnx_ensemble(args, table)
    with printed_warnings(), executor_for(args) as executor:  # e.g. a torn last ledger line moved aside
        res = predict(table, args.registry, members=args.members, vote=args.vote, weights=weights,
                      recipe=args.recipe, tta=args.tta, merge=args.merge, backend=args.backend, out=args.out,
                      with_probs=args.probs, overwrite=args.overwrite, use_cache=args.use_cache,
                      batch_size=args.batch_size, workers=default_workers() if args.workers is None else args.workers,
                      device=args.device, cache_dir=args.cache_dir, progress=True, executor=executor)
    sub = res.submission
    con = console()
    t = Table(title=f"predict · {len(res.ids)} images · vote {res.vote} · TTA {res.inputs['tta']} "
                    f"({res.inputs['merge']}) · {res.inputs['backend']}", title_justify="left")
    for col, just in (("member", "left"), ("weight", "right"), ("checkpoints", "right"), ("sha256", "left"),
                      ("cached", "left")):
        t.add_column(col, justify=just)
    weights_used = res.weights or [None] * len(res.members)
    for rec, w in zip(res.inputs["members"], weights_used):
        cached = rec["cached"]
        t.add_row(rec["name"] + (f" [{rec['tta']}]" if res.inputs["tta"] == "per member" else ""), "" if w is None else f"{w:.3f}", str(len(rec["checkpoints"])),
                  ", ".join(c["sha256"][:10] for c in rec["checkpoints"][:3])
                  + (" …" if len(rec["checkpoints"]) > 3 else ""),
                  "yes" if cached else "no")
    con.print(t)
    counts = {}
    for p in res.pred.tolist():
        counts[p] = counts.get(p, 0) + 1
    top = sorted(counts.items(), key=lambda kv: -kv[1])[:5]
    con.print("predicted classes (top 5): " + ", ".join(f"{res.label_space.classes[k]}={n}" for k, n in top),
              highlight=False)
    if res.recipe_hash:
        con.print(f"recipe: {args.recipe} (hash {res.recipe_hash[:12]})", markup=False, highlight=False)
    if res.tie_rate is not None:
        con.print(f"hard-vote ties: {res.tie_rate:.1%} of rows (broken to the smallest class index)", highlight=False)
    replaced = res.inputs.get("tta_replaced") or {}
    if replaced:
        shown = ", ".join(f"{k} ({v})" for k, v in list(replaced.items())[:4]) + (" …" if len(replaced) > 4 else "")
        err_console().print(f"[yellow]note:[/] --tta {escape(res.inputs['tta'])} replaced the plans these recipe "
                            f"members were tuned with: {escape(shown)}; leave --tta out to run their own",
                            highlight=False)
    print_submission(con, sub)
    return 0


def _predict_onnx_ensemble(args, table) -> int:
    from ..export import predict_onnx, read_ensemble_meta

    meta = read_ensemble_meta(args.model)
    given = {"--recipe": args.recipe, "--members": None if args.members == "all" else args.members,
             "--weights": args.weights, "--tta": None if args.tta in (None, "none", meta["tta"]) else args.tta,
             "--merge": None if args.merge in (None, "mean-logits", meta["merge"]) else args.merge}
    clash = [flag for flag, v in given.items() if v is not None]
    if clash:
        raise EnsemblerError(f"{', '.join(clash)} cannot be used with --backend onnx-ensemble: {args.model} was "
                             f"exported with its recipe {meta['recipe_hash'][:12]}, TTA {meta['tta']} "
                             f"({meta['merge']}); export again to change them")
    with printed_warnings():  # e.g. a torn last ledger line moved aside
        res = predict_onnx(table, args.model, out=args.out, with_probs=args.probs, overwrite=args.overwrite,
                           batch_size=args.batch_size,
                           workers=default_workers() if args.workers is None else args.workers,
                           device=args.device, progress=True)
    con, sub = console(), res.submission
    con.print(f"predict · {len(res.ids)} images · {args.model} (onnx-ensemble) · recipe {res.recipe_hash[:12]} · "
              f"vote {res.vote} · TTA {meta['tta']} ({meta['merge']}) · {len(res.members)} members", highlight=False,
              markup=False)
    if res.tie_rate is not None:
        con.print(f"hard-vote ties: {res.tie_rate:.1%} of rows (broken to the smallest class index)", highlight=False)
    print_submission(con, sub)
    return 0


def _fmt(x, digits=4):
    return "–" if x is None else f"{x:.{digits}f}"


def cmd_evaluate(args) -> int:
    from rich.markup import escape
    from rich.table import Table

    from ..evaluate import evaluate

    weights = parse_float_list(args.weights, "--weights")
    if sum(x is not None for x in (args.logits, args.recipe)) + (args.members is not None and not args.logits) != 1:
        raise EnsemblerError("evaluate needs exactly one of --logits FILE, --recipe FILE or --members NAMES")
    from ..evaluate import logits_age_bands
    from ..predict import member_age_bands

    bands = None
    if args.data:
        bands = (logits_age_bands(args.logits) if args.logits else
                 member_age_bands(args.registry, args.members or "all", args.recipe))
    table = _load_table(args, bands) if args.data else None
    if args.logits is None and table is None:
        raise EnsemblerError("--recipe/--members need labeled --data to score against")
    members = args.members
    res = evaluate(table, args.registry, logits=args.logits, recipe=args.recipe, members=members, vote=args.vote,
                   weights=weights, tta=args.tta, merge=args.merge, backend=args.backend, plot=args.plot,
                   use_cache=args.use_cache, batch_size=args.batch_size,
                   workers=default_workers() if args.workers is None else args.workers, device=args.device,
                   cache_dir=args.cache_dir, progress=True, overwrite=args.overwrite, f1_labels=args.f1_labels)
    con = console()
    rule = "" if args.f1_labels == "present" else " (all classes)"
    con.print(f"[bold]{escape(res.name)}[/] on {res.rows} rows: macro-F1{rule} [bold]{res.f1:.4f}[/], "
              f"accuracy {res.acc:.4f}"
              + (f", log-loss {res.logloss:.4f}" if res.logloss is not None else ""), highlight=False)
    if res.tie_rate is not None:
        con.print(f"hard-vote ties: {res.tie_rate:.1%} of rows (broken to the smallest class index)", highlight=False)
    if res.member_scores:
        mt = Table(title="each member alone", title_justify="left")
        for col in ("member", "macro-F1", "acc", "log-loss"):
            mt.add_column(col, justify="left" if col == "member" else "right")
        for name, s in res.member_scores.items():
            mt.add_row(name, _fmt(s["f1"]), _fmt(s["acc"]), _fmt(s["logloss"]))
        mt.add_row(f"ensemble ({args.vote if not args.recipe else 'recipe'})", _fmt(res.f1), _fmt(res.acc),
                   _fmt(res.logloss), style="bold")
        con.print(mt)
    t = Table(title="per class", title_justify="left")
    for col in ("class", "precision", "recall", "F1", "support", "predicted"):
        t.add_column(col, justify="left" if col == "class" else "right")
    for r in res.per_class:
        t.add_row(r["class"], _fmt(r["precision"], 3), _fmt(r["recall"], 3), _fmt(r["f1"], 3), str(r["support"]),
                  str(r["predicted"]))
    con.print(t)
    if res.plot is not None:
        con.print(f"confusion matrix: {res.plot}", markup=False, highlight=False)
    return 0
