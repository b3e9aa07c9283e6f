"""`ensembler data inspect` and `ensembler data split`: look at a dataset, write its folds."""

from __future__ import annotations

from ._common import add_data_args, add_group, console, err_console, printed_warnings


def register(sub) -> None:
    """Add the ``data`` group: ``inspect`` and ``split``."""
    _, gsub = add_group(sub, "data", "Inspect a dataset and write its grouped, stratified k-fold split.")

    p = gsub.add_parser(
        "inspect",
        help="images, groups and per-class counts of a dataset (and per-fold balance with --k)",
        description="Print what a dataset holds: images, groups, whether it is labeled, images per class; "
        "with --k also the grouped stratified split's class balance per fold.",
    )
    add_data_args(p)
    p.add_argument("--k", type=int, default=None, metavar="K",
                   help="also split into K grouped stratified folds and show each fold's class balance")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="split seed (default 0)")
    p.add_argument("--verify", action="store_true",
                   help="decode every image and list the files that fail (exit 1 if any), and byte-identical "
                        "copies in different groups or with different labels")
    p.set_defaults(func=_inspect)

    p = gsub.add_parser(
        "split",
        help="write the dataset with grouped stratified k-fold assignments to a CSV",
        description="Split a labeled dataset into K folds (scikit-learn's StratifiedGroupKFold: no group in "
        "two folds, class balance kept) and write id,path,label,group,fold,class_name (plus the "
        "source's extra columns) to a CSV, atomically. The CSV can be read back with --data.",
    )
    add_data_args(p)
    p.add_argument("--k", type=int, default=5, metavar="K", help="number of folds (default 5)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="split seed (default 0)")
    p.add_argument("--out", required=True, metavar="FILE.csv", help="where to write the CSV")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=_split)


def _summary_table(table):
    from rich.table import Table

    import numpy as np

    src = table.source
    t = Table(title="dataset", show_header=False, title_justify="left")
    t.add_column("key", style="bold")
    t.add_column("value")
    kind = src.get("kind", "?") + (f" ({src['layout']})" if "layout" in src else "")
    t.add_row("source", kind)
    if src.get("path"):
        t.add_row("path", str(src["path"]))
    t.add_row("images", str(len(table)))
    _, sizes = np.unique(table.groups, return_counts=True)
    if len(sizes) == len(table):
        t.add_row("groups", f"{len(sizes)}  (one per image)")
    else:
        per = f"{sizes.min()}" if sizes.min() == sizes.max() else f"{sizes.min()}-{sizes.max()}, median {np.median(sizes):g}"
        t.add_row("groups", f"{len(sizes)}  ({per} images per group)")
    t.add_row("labeled", "yes" if table.labeled else "no (a set to predict)")
    ls = table.label_space
    if ls is not None:
        classes = f"{ls.num_classes}"
        if ls.is_factored:
            classes += "  (" + " x ".join(f"{f.name} {f.size}" for f in ls.factors) + ")"
        t.add_row("classes", classes)
    if "age_bands" in src:
        lo, hi = src["age_bands"]
        t.add_row("age bands", f"<{lo}, {lo}-{hi - 1}, >={hi}")
    if src.get("label_fix"):
        t.add_row("label fix", f"{src['label_fix']} ({src.get('label_fix_profiles', 0)} profiles changed)")
    if src.get("info_csv"):
        t.add_row("info.csv", str(src["info_csv"]))
    return t


def _class_table(table):
    from rich.table import Table

    import numpy as np

    counts = table.class_counts()
    group_counts = np.zeros_like(counts)
    for c in range(len(counts)):
        group_counts[c] = len(np.unique(table.groups[table.labels == c]))
    t = Table(title="images per class", title_justify="left")
    t.add_column("#", justify="right")
    t.add_column("class")
    t.add_column("images", justify="right")
    t.add_column("share", justify="right")
    t.add_column("groups", justify="right")
    n = max(len(table), 1)
    for c, name in enumerate(table.label_space.classes):
        style = "red" if counts[c] == 0 else None
        t.add_row(str(c), name, str(counts[c]), f"{100 * counts[c] / n:.1f}%", str(group_counts[c]), style=style)
    return t


def _fold_table(table):
    from rich.table import Table

    import numpy as np

    from ..data import fold_class_counts

    counts = fold_class_counts(table)  # (C, k)
    k = counts.shape[1]
    src = table.source.get("folds", {})
    title = f"class balance over {k} folds" + (f" (seed {src['seed']})" if "seed" in src else "")
    t = Table(title=title, title_justify="left", caption="cells: images of the class in each fold; "
              "spread: largest minus smallest share of the class across folds")
    t.add_column("class")
    for f in range(k):
        t.add_column(f"fold {f}", justify="right")
    t.add_column("spread", justify="right")
    for c, name in enumerate(table.label_space.classes):
        total = counts[c].sum()
        spread = f"{100 * (counts[c].max() - counts[c].min()) / total:.1f}pp" if total else "-"
        t.add_row(name, *(str(v) for v in counts[c]), spread)
    sizes = counts.sum(axis=0)
    n = max(sizes.sum(), 1)
    groups = [len(np.unique(table.groups[table.folds == f])) for f in range(k)]
    t.add_section()
    t.add_row("images", *(str(s) for s in sizes), "", style="bold")
    t.add_row("share", *(f"{100 * s / n:.1f}%" for s in sizes), "", style="bold")
    t.add_row("groups", *(str(g) for g in groups), "", style="bold")
    return t


def _inspect(args) -> int:
    import warnings

    from ..data import load_source_from_args, split_folds, verify_images, warn_identical_images

    out = console()
    with printed_warnings():
        table = load_source_from_args(args)
        out.print(_summary_table(table))
        if table.labeled:
            out.print(_class_table(table))
        if args.k is not None:
            out.print(_fold_table(split_folds(table, args.k, args.seed)))
        elif table.has_folds and table.labeled:  # a CSV written by `data split`: show its folds
            out.print(_fold_table(table))
    if args.verify:
        from rich.progress import Progress

        with Progress(console=err_console(), transient=True) as bar:
            task = bar.add_task("decoding", total=len(table))
            failures = verify_images(table.paths, progress=lambda: bar.advance(task))
        if failures:
            # Plain "file: reason" lines, never a table: a file name is never cut at the terminal's
            # width, and each line can be grepped or pasted into a shell.
            out.print(f"{len(failures)} of {len(table)} images fail to decode:", style="bold red", highlight=False)
            for path, reason in failures:
                out.print(f"{path}: {reason}", markup=False, highlight=False, soft_wrap=True)
            return 1
        out.print(f"all {len(table)} images decode")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # every line is printed below, whole
            lines = warn_identical_images(table)
        if lines:
            out.print(f"{len(lines)} image(s) have a byte-identical copy in another group or with another label "
                      "(a copy in another group can sit in train and validation at once):", style="bold yellow",
                      highlight=False)
            for line in lines:
                out.print(line, markup=False, highlight=False, soft_wrap=True)
    return 0


def _split(args) -> int:
    from pathlib import Path

    from .._io import refuse_existing
    from ..data import load_source_from_args, split_folds, warn_identical_images

    refuse_existing(args.out, overwrite=args.overwrite)  # before the data is read
    out = console()
    with printed_warnings():
        table = split_folds(load_source_from_args(args), args.k, args.seed)
        warn_identical_images(table)  # byte-identical copies in two groups could land in two folds
    path = table.to_csv(Path(args.out))
    out.print(_fold_table(table))
    out.print(f"wrote {len(table)} rows in {args.k} folds (seed {args.seed}) to {path}", highlight=False)
    return 0
