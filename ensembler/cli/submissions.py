"""`ensembler vote-files` and `ensembler ledger score/list`: earlier submission files and their scores.

Parsing and printing only; the work is :func:`ensembler.vote_files.vote_files` and
:func:`ensembler.submit.record_score`.
"""

from __future__ import annotations

from ..names import FILE_VOTES, LEADERBOARDS, TIE_BREAKS
from ._common import add_group, console, err_console, parse_float_list, print_submission


def register(sub) -> None:
    """Add ``vote-files`` and ``ledger score/list`` to the top-level parser."""
    p = sub.add_parser(
        "vote-files", help="hard or soft vote over earlier submission CSVs; write the result and a ledger row",
        description="Combine earlier submission files (mask eval layout ImageID,ans, or id,label[,class_name]) by "
                    "a hard vote (ties: smallest class, or --tie-break first = the earliest file) or a soft vote "
                    "over their prob_<class> columns (predict --probs). Ids must match exactly. --top N picks the "
                    "N best files by their leaderboard score in the ledger (`ensembler ledger score`), best first.")
    p.add_argument("files", nargs="*", metavar="CSV", help="submission files, best-ranked first (with --top: the "
                                                           "candidates; default every scored file of the ledger)")
    p.add_argument("--vote", choices=FILE_VOTES, default="hard", help="hard (default) or soft (prob_ columns)")
    p.add_argument("--weights", default=None, metavar="W1,W2,...", help="one weight per file, in the order used")
    p.add_argument("--tie-break", choices=TIE_BREAKS, default="smallest",
                   help="smallest class index (scikit-learn's rule, default) or the earliest file's vote")
    p.add_argument("--top", type=int, default=None, metavar="N", help="the N best-scored files of the ledger")
    p.add_argument("--board", choices=LEADERBOARDS, default="public", help="the score --top ranks by")
    p.add_argument("--ledger", default=None, metavar="FILE", help="default: ledger.jsonl beside --out")
    p.add_argument("--out", required=True, metavar="CSV", help="the voted submission, e.g. submissions/vote8.csv")
    p.add_argument("--overwrite", action="store_true", help="replace an existing submission with different content")
    p.set_defaults(func=cmd_vote_files)

    _, cmds = add_group(sub, "ledger", "what was submitted: leaderboard scores of submission files")
    p = cmds.add_parser("score", help="record a leaderboard score of a submission file",
                        description="Append the public (or --private) leaderboard score of FILE to the ledger; "
                                    "vote-files --top N then picks the N best files.")
    p.add_argument("file", metavar="FILE", help="the submission that was scored")
    p.add_argument("score", metavar="SCORE", help="the leaderboard's number, e.g. 0.8022")
    p.add_argument("--private", dest="board", action="store_const", const="private", default="public",
                   help="a private-leaderboard score (default public)")
    p.add_argument("--ledger", default=None, metavar="FILE", help="default: ledger.jsonl beside FILE")
    p.set_defaults(func=cmd_ledger_score)

    p = cmds.add_parser("list", help="scored submission files, best first",
                        description="Every submission file with a leaderboard score in the ledger, best first.")
    p.add_argument("--ledger", default="submissions/ledger.jsonl", metavar="FILE",
                   help="default submissions/ledger.jsonl")
    p.add_argument("--board", choices=LEADERBOARDS, default="public", help="order by this score")
    p.set_defaults(func=cmd_ledger_list)


def cmd_vote_files(args) -> int:
    from rich.markup import escape
    from rich.table import Table

    from ..vote_files import vote_files

    res = vote_files(args.files, vote=args.vote, weights=parse_float_list(args.weights, "--weights"),
                     tie_break=args.tie_break, top=args.top, board=args.board, out=args.out, ledger=args.ledger,
                     overwrite=args.overwrite)
    con = console()
    t = Table(title=f"vote-files · {len(res.ids)} rows · {res.vote} vote · ties → {res.tie_break}",
              title_justify="left")
    for col, just in (("#", "right"), ("file", "left"), (f"{args.board} score", "right"), ("weight", "right"),
                      ("sha256", "left")):
        t.add_column(col, justify=just, overflow="fold")
    for i, f in enumerate(res.files):
        score = res.scores.get(str(f.path))
        t.add_row(str(i + 1), escape(str(f.path)), "" if score is None else f"{score:.4f}",
                  "1" if res.weights is None else f"{res.weights[i]:g}", f.sha256[:12])
    con.print(t)
    rule = "smallest class index" if res.tie_break == "smallest" else "the earliest file's vote"
    con.print(f"ties: {res.tie_rate:.1%} of rows (broken to {rule}); all files agree on {res.agreement:.1%}; "
              f"the vote differs from the first file on {res.changed:.1%}", highlight=False)
    sub = res.submission
    print_submission(con, sub)
    return 0


def cmd_ledger_score(args) -> int:
    from ..submit import LEDGER_NAME, record_score
    from pathlib import Path

    rec = record_score(args.file, args.score, board=args.board, ledger=args.ledger)
    ledger = args.ledger or Path(args.file).parent / LEDGER_NAME
    console().print(f"{args.board} score {rec[args.board]:.4f} recorded for {args.file} "
                    f"(sha256 {rec['file_sha256'][:12]}) in {ledger}", markup=False, highlight=False)
    return 0


def cmd_ledger_list(args) -> int:
    from rich.table import Table

    from ..submit import ledger_scores

    scores = ledger_scores(args.ledger)
    if not scores:
        err_console().print(f"{args.ledger}: no scored submissions (ensembler ledger score FILE SCORE)",
                            markup=False, highlight=False)
        return 0
    other = "private" if args.board == "public" else "public"
    t = Table(title=f"{args.ledger}: scored submissions, best {args.board} first", title_justify="left")
    for col, just in (("#", "right"), ("file", "left"), (args.board, "right"), (other, "right")):
        t.add_column(col, justify=just, overflow="fold")
    rows = sorted(scores.items(), key=lambda kv: -kv[1].get(args.board, float("-inf")))
    for i, (f, s) in enumerate(rows, 1):
        t.add_row(str(i), f, *(f"{s[b]:.4f}" if b in s else "–" for b in (args.board, other)))
    console().print(t)
    return 0
