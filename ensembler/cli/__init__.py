"""Command line: ``ensembler <command> ...``.

argparse (standard library) rather than Typer/Click: no extra dependency, and each command
group imports torch/timm lazily inside its handler, so ``ensembler --help`` answers in well
under a second. Each command group lives in its own module with a ``register(subparsers)``
function; handlers parse and print, and call one function of the plain Python API.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import EnsemblerError

# Command-group modules, in the order ``--help`` lists them.
COMMAND_MODULES = ("data", "train", "registry", "infer", "ensemble", "predict", "submissions", "export", "report",
                   "demo")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="ensembler",
        description="Train k-fold image classifiers, run batched TTA inference, and blend them by voting "
        "with weights tuned on out-of-fold logits.",
    )
    parser.add_argument("--version", action="version", version=f"ensembler {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        module = importlib.import_module(f".{name}", __name__)
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        # A group without a sub-command (e.g. ``ensembler data``) prints its own help.
        (getattr(args, "group_parser", None) or parser).print_help()
        return 0 if args.command is None else 2
    try:
        rc = func(args)
    except EnsemblerError as exc:
        from rich.markup import escape

        from ._common import err_console

        # The message is printed as written: escaped, so "[nan, 1]" or a path with brackets is not
        # swallowed as console markup.
        message = str(exc)
        message = _as_flag_message(message, getattr(exc, "parameter", None))
        err_console().print(f"[bold red]error:[/] {escape(message)}", highlight=False, markup=True)
        return 2
    except KeyboardInterrupt:
        from ._common import err_console

        err_console().print("[yellow]interrupted[/]")
        return 130
    return int(rc or 0)


def _as_flag_message(message: str, parameter: str | None) -> str:
    """A ParameterError names the API's parameter; the user typed its flag: name that instead.

    >>> _as_flag_message("weight_decay must be >= 0, got -1", "weight_decay")
    '--weight-decay must be >= 0, got -1'
    >>> _as_flag_message("weights has 3 entries but there are 2 members", "weights")
    '--weights has 3 entries but there are 2 members'
    >>> _as_flag_message("a vote needs at least one member", "member_logits")
    '--member-logits: a vote needs at least one member'
    """
    if not parameter:
        return message
    flag = "--" + parameter.replace("_", "-")
    if message.startswith(parameter) and message[len(parameter):len(parameter) + 1] in (" ", ":", ""):
        return flag + message[len(parameter):]
    return message if flag in message else f"{flag}: {message}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
