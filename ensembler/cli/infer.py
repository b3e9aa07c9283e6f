"""`ensembler export-onnx` and `ensembler infer`: ONNX export with parity, raw member logits.

Handlers parse and print; the work is :mod:`ensembler.infer` (``export_onnx``,
``predict_members``, ``save_member_logits``). Voting and submissions are ``ensembler predict``.
"""

from __future__ import annotations

import os

from ..errors import EnsemblerError
from ._common import add_data_args, add_registry_arg, console


def _default_workers() -> int:
    # One decode process per spare core (the main process runs the model), at most 4.
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def register(sub) -> None:
    """Add ``export-onnx`` and ``infer`` to the top-level parser."""
    p = sub.add_parser(
        "export-onnx", help="export a checkpoint to ONNX and check parity with torch",
        description="Write model.onnx next to a checkpoint's weights (dynamic batch axis), record its sha256, "
                    "and compare onnxruntime with torch on a random batch. Prints the max abs difference; "
                    "exits non-zero (and writes nothing) above --atol.")
    add_registry_arg(p)
    p.add_argument("id", help="registry entry id")
    p.add_argument("--opset", type=int, default=None, metavar="N", help="ONNX opset (default 17)")
    p.add_argument("--atol", type=float, default=1e-4, help="parity tolerance, max abs difference (default 1e-4)")
    p.set_defaults(func=cmd_export_onnx)

    p = sub.add_parser(
        "infer", help="run registry members over data and write their raw logits",
        description="Run members (families are averaged over their folds) with a TTA plan and write raw "
                    "member logits (npz + json sidecar) for later voting. Logits are cached per checkpoint; "
                    "a repeated run with the same key does no forward pass.")
    add_data_args(p)
    add_registry_arg(p)
    p.add_argument("--members", default="all", metavar="all|NAMES",
                   help="'all', or comma-separated family names / checkpoint ids (default all)")
    p.add_argument("--tta", default="none", metavar="PLAN",
                   help="TTA plan: none, hflip, vflip, flip, d4, center-crop=S, five-crop=S, ten-crop=S, "
                        "scales=0.9,1,1.1; combine with '+' (default none)")
    p.add_argument("--merge", default="mean-logits", metavar="RULE",
                   help="merge over views: mean-logits (default), mean-probs, gmean-probs, max-probs")
    p.add_argument("--backend", choices=("torch", "onnx"), default="torch")
    p.add_argument("--out", required=True, metavar="PATH", help="output .npz (a .json sidecar is written beside it)")
    p.add_argument("--no-cache", dest="use_cache", action="store_false", help="force a forward pass")
    p.add_argument("--cache-dir", default=None, metavar="PATH",
                   help="logit cache (default $ENSEMBLER_CACHE/logits or <registry>/../.ensembler_cache/logits)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=None, help=f"decode processes (default {_default_workers()})")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--amp", choices=("auto", "fp16", "bf16", "off"), default="auto",
                   help="autocast precision on CUDA (default auto: bf16 where supported)")
    p.add_argument("--compile", action="store_true", help="torch.compile each model")
    p.set_defaults(func=cmd_infer)


def cmd_export_onnx(args) -> int:
    from ..infer.onnx import export_onnx
    from ..registry import Registry

    if args.atol <= 0:
        raise EnsemblerError(f"--atol must be positive, got {args.atol}")
    result = export_onnx(Registry(args.registry), args.id, opset=args.opset, atol=args.atol)
    out = console()
    out.print(f"wrote {result.path} (opset {result.opset}, sha256 {result.sha256[:16]}…)", highlight=False)
    out.print(f"parity: max abs diff {result.max_abs_diff:.3g} <= atol {result.atol:g}", highlight=False)
    return 0


def cmd_infer(args) -> int:
    from rich.table import Table

    from ..data import load_source_from_args
    from ..infer import predict_members, save_member_logits
    from ..registry import Registry

    if not str(args.out).endswith(".npz"):
        raise EnsemblerError(f"--out must be a .npz file, got {args.out!r}")
    table = load_source_from_args(args)
    workers = _default_workers() if args.workers is None else args.workers
    results = predict_members(
        table, args.members, Registry(args.registry), tta=args.tta, merge=args.merge, backend=args.backend,
        batch_size=args.batch_size, workers=workers, device=args.device, cache_dir=args.cache_dir,
        use_cache=args.use_cache, amp=False if args.amp == "off" else args.amp, compile=args.compile,
        progress=True)
    path = save_member_logits(args.out, results)

    t = Table(title=f"member logits over {len(table)} images · TTA {next(iter(results.values())).meta['tta']}")
    for col in ("member", "checkpoints", "classes", "views", "backend", "cached", "seconds"):
        t.add_column(col, justify="right" if col in ("classes", "views", "seconds") else "left")
    for name, m in results.items():
        t.add_row(name, str(len(m.meta["checkpoints"])), str(m.num_classes), str(m.meta["views"]),
                  f"{m.meta['backend']} {m.meta['precision']}", "yes" if m.meta["cached"] else "no",
                  f"{m.meta['seconds']:.1f}")
    out = console()
    out.print(t)
    out.print(f"wrote {path}", highlight=False)
    return 0
