"""Shared CLI plumbing: consoles, common options, parsing helpers."""

from __future__ import annotations

import argparse
import contextlib
import os
import warnings
from functools import lru_cache

from ..errors import EnsemblerError


@lru_cache(maxsize=1)
def console():
    from rich.console import Console

    return Console()


@lru_cache(maxsize=1)
def err_console():
    from rich.console import Console

    return Console(stderr=True)


@contextlib.contextmanager
def printed_warnings():
    """Show library UserWarnings (small classes, unused label fixes, partial OOF) as yellow
    lines on stderr, once each, also when the command fails."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        try:
            yield
        finally:
            seen = set()
            for w in caught:
                msg = str(w.message)
                if msg not in seen and issubclass(w.category, UserWarning):
                    seen.add(msg)
                    err_console().print(f"[yellow]warning:[/] {msg}", highlight=False, markup=True)


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
    p.add_argument("--source", choices=("csv", "folder", "mask", "digits"), default=None,
                   help="force the kind of --data instead of detecting it")
    p.add_argument("--age-bands", default=None, metavar="LO,HI",
                   help="mask data: age thresholds, e.g. 29,58 (default 30,60)")
    p.add_argument("--label-fix", default=None, metavar="CSV",
                   help="mask data: CSV of profile id -> corrected gender/mask")


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
