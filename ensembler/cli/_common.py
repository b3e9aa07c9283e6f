"""Shared CLI plumbing: consoles, common options, parsing helpers."""

from __future__ import annotations

import argparse
import contextlib
import os
import warnings
from functools import lru_cache

from rich.markup import escape

from ..errors import EnsemblerError
from ..names import AMP_MODES, BACKENDS, MERGE_RULE_NAMES, SOURCE_KINDS, TTA_TOKENS


@lru_cache(maxsize=1)
def console():
    """stdout; 200 columns wide when it is not a terminal, so no table column is cut in a log file."""
    from ..progress import make_console

    return make_console()


@lru_cache(maxsize=1)
def err_console():
    from ..progress import make_console

    return make_console(stderr=True)


@contextlib.contextmanager
def printed_warnings():
    """Show library UserWarnings (small classes, unused label fixes, partial OOF) as yellow
    lines on stderr when they arise (not after a long run), once each, also when the command fails."""
    seen: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None):
        msg = str(message)
        if issubclass(category, UserWarning) and msg not in seen:
            seen.add(msg)
            err_console().print(f"[yellow]warning:[/] {escape(msg)}", highlight=False, markup=True)

    with warnings.catch_warnings():
        warnings.simplefilter("always", UserWarning)
        warnings.showwarning = show
        yield


def print_submission(con, sub) -> None:
    """The written submission (path, rows, sha256) and its ledger; the warning when it repeats an earlier one."""
    con.print(f"submission: [bold]{escape(str(sub.path))}[/] ({sub.rows} rows, sha256 {sub.sha256[:16]}…)",
              highlight=False)
    con.print(f"ledger: {sub.ledger}", markup=False, highlight=False)
    msg = sub.repeat_message()
    if msg:
        con.print(msg, style="bold yellow", markup=False, highlight=False)


def add_group(sub, name: str, help: str) -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """A command group (``ensembler registry ...``) whose bare form prints its help."""
    p = sub.add_parser(name, help=help, description=help)
    p.set_defaults(group_parser=p, func=None)
    return p, p.add_subparsers(dest=f"{name}_command", metavar="COMMAND")


def add_registry_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--registry",
        default=None,
        metavar="PATH",
        help="registry folder (default: $ENSEMBLER_REGISTRY or ./checkpoints)",
    )


def add_data_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument(
        "--data",
        required=required,
        metavar="SPEC",
        help="a CSV manifest, an image-folder tree, a mask-competition folder, or the word 'digits'",
    )
    p.add_argument("--source", choices=SOURCE_KINDS, default=None,
                   help="force the kind of --data instead of detecting it")
    p.add_argument("--age-bands", default=None, metavar="LO,HI",
                   help="mask data: age thresholds, e.g. 29,58 (default 30,60)")
    p.add_argument("--label-fix", default=None, metavar="CSV",
                   help="mask data: CSV of profile id -> corrected gender/mask")


def default_workers() -> int:
    """Decode processes when --workers is not given: one per spare core (the main process runs
    the models), at most 4."""
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def add_engine_args(p: argparse.ArgumentParser, *, views: bool = True, amp: bool = False,
                    recipe: bool = False, backends: tuple[str, ...] = BACKENDS) -> None:
    """The engine's options, shared by every command that runs models over images.

    ``views=False`` leaves out ``--tta``/``--merge`` for a command that defines its own
    (``tta-report``: a required plan to judge, the merge rule of the file it writes).
    ``recipe=True`` (predict, evaluate): ``--tta``/``--merge`` default to None, i.e. a recipe's
    members run the plans they were tuned with (else ``none``/``mean-logits``).
    ``amp=True`` adds ``--amp``. ``--workers`` defaults to None: use :func:`default_workers`.
    """
    if views:
        tail = ("; default: with --recipe, the plan each member was tuned with, else none" if recipe else
                " (default none)")
        p.add_argument("--tta", default=None if recipe else "none", metavar="PLAN",
                       help=f"TTA plan: {', '.join(TTA_TOKENS)}; combine with '+'; PLAN@VIEW,VIEW keeps only those "
                            "views" + tail)
        p.add_argument("--merge", default=None if recipe else "mean-logits", metavar="RULE",
                       help=f"merge over TTA views: {', '.join(MERGE_RULE_NAMES)} (default mean-logits"
                            + ("; with --recipe, each member's own)" if recipe else ")"))
    p.add_argument("--backend", choices=backends, default="torch")
    p.add_argument("--no-cache", dest="use_cache", action="store_false",
                   help="force a forward pass instead of reusing cached logits")
    p.add_argument("--cache-dir", default=None, metavar="PATH",
                   help="logit cache (default $ENSEMBLER_CACHE/logits or <registry>/../.ensembler_cache/logits)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=None, help=f"decode processes (default {default_workers()})")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    if amp:
        p.add_argument("--amp", choices=AMP_MODES, default="auto",
                       help="autocast precision on CUDA (default auto: bf16 where supported)")


def parse_int_list(text: str | None, flag: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(t) for t in str(text).split(",") if t.strip() != ""]
    except ValueError:
        raise EnsemblerError(f"{flag} expects comma-separated integers, got {text!r}") from None


def parse_float_list(text: str | None, flag: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(t) for t in str(text).split(",") if t.strip() != ""]
    except ValueError:
        raise EnsemblerError(f"{flag} expects comma-separated numbers, got {text!r}") from None


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def add_executor_args(p, unit: str = "fold") -> None:
    """``--executor local|ray`` and the Ray flags; ``unit`` names the work (``fold``, ``worker``)."""
    from ..names import EXECUTORS

    p.add_argument("--executor", choices=EXECUTORS, default="local",
                   help=f"where each {unit} runs: local (this process, default) or ray (a Ray cluster)")
    p.add_argument("--ray-address", default=None, metavar="auto|HOST:PORT",
                   help="the Ray cluster: auto (the one `ray start --head` runs here), HOST:PORT of its head "
                        "(default: $RAY_ADDRESS, else a Ray instance started on this machine for the run)")
    p.add_argument(f"--gpus-per-{unit}", dest="gpus_per_task", type=float, default=None, metavar="N",
                   help=f"GPUs each {unit} holds on Ray (default 1 when the cluster has GPUs, else 0)")
    p.add_argument(f"--cpus-per-{unit}", dest="cpus_per_task", type=float, default=None, metavar="N",
                   help=f"CPUs each {unit} holds on Ray (its torch threads; default 1)")
    p.add_argument("--max-retries", type=int, default=None, metavar="N",
                   help=f"times a {unit} whose Ray worker died is run again (default 1)")
    if unit == "worker":
        p.add_argument("--ray-workers", type=int, default=None, metavar="N",
                       help="inference actors (default: as many as the cluster's GPUs or CPUs allow)")


def executor_from_args(args, unit: str = "fold"):
    """``"local"``, or the RayExecutor the flags describe (connecting to the cluster now)."""
    ray_flags = {"--ray-address": args.ray_address, f"--gpus-per-{unit}": args.gpus_per_task,
                 f"--cpus-per-{unit}": args.cpus_per_task, "--max-retries": args.max_retries,
                 "--ray-workers": getattr(args, "ray_workers", None)}
    if args.executor == "local":
        given = [flag for flag, value in ray_flags.items() if value is not None]
        if given:
            raise EnsemblerError(f"{', '.join(given)} only apply with --executor ray")
        return "local"
    from ..executors import RayExecutor

    return RayExecutor(args.ray_address, gpus_per_task=args.gpus_per_task, cpus_per_task=args.cpus_per_task or 1,
                       max_retries=1 if args.max_retries is None else args.max_retries,
                       workers=getattr(args, "ray_workers", None), unit=unit)


@contextlib.contextmanager
def executor_for(args, unit: str = "worker"):
    """The executor of :func:`executor_from_args`, closed (a Ray instance started for the run
    stopped) when the command is done."""
    ex = executor_from_args(args, unit=unit)
    try:
        yield ex
    finally:
        if not isinstance(ex, str):
            ex.close()
