"""`ensembler export-ensemble`: a recipe, its checkpoints and a TTA plan as one ONNX file.

Parsing and printing only; the work is :func:`ensembler.export.export_ensemble`.
"""

from __future__ import annotations

from ..names import EXPORT_INPUTS
from ._common import add_registry_arg, console


def register(sub) -> None:
    """Add ``export-ensemble`` to the top-level parser."""
    p = sub.add_parser(
        "export-ensemble", help="write a recipe + its members + TTA as one ONNX graph (uint8 images -> probabilities)",
        description="Trace everything `predict --recipe` does after decoding (each member's geometry and "
                    "normalisation, TTA views, head, merge, fold mean, temperature, weights, vote, class biases) "
                    "into one ONNX graph with a dynamic batch. Input: uint8 NCHW RGB at the geometry printed "
                    "(recorded in the metadata). Run it with `ensembler predict --backend onnx-ensemble --model "
                    "FILE`. Nothing is written when onnxruntime and torch disagree above --atol.")
    add_registry_arg(p)
    p.add_argument("--recipe", required=True, metavar="FILE", help="recipe JSON from tune-weights")
    p.add_argument("--tta", default="none", metavar="PLAN", help="TTA plan built into the graph (default none)")
    p.add_argument("--merge", default="mean-logits", metavar="RULE", help="merge over TTA views (default mean-logits)")
    p.add_argument("--inputs", choices=EXPORT_INPUTS, default="one",
                   help="one uint8 input at the most common member geometry (others resized inside the graph: "
                        "close to the engine, not equal), or one input per member geometry (equal to the engine)")
    p.add_argument("--out", required=True, metavar="ONNX", help="file to write, e.g. ensemble.onnx")
    p.add_argument("--opset", type=int, default=18, metavar="N", help="ONNX opset (default 18)")
    p.add_argument("--atol", type=float, default=1e-4, help="parity tolerance on probabilities (default 1e-4)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_export_ensemble)


def cmd_export_ensemble(args) -> int:
    from ..export import export_ensemble

    res = export_ensemble(args.recipe, args.registry, args.out, tta=args.tta, merge=args.merge, inputs=args.inputs,
                          opset=args.opset, atol=args.atol, overwrite=args.overwrite)
    con = console()
    con.print(f"wrote {res.path} ({res.path.stat().st_size / 1e6:.1f} MB, sha256 {res.sha256[:16]}…): "
              f"{len(res.meta['members'])} members, {res.checkpoints} checkpoints, {res.views} views "
              f"(TTA {res.meta['tta']}, {res.meta['merge']}), vote {res.meta['vote']}, recipe {res.recipe_hash[:12]}",
              markup=False, highlight=False)
    for geo in res.meta["inputs"]:
        h, w = geo["input_size"]
        con.print(f"input '{geo['name']}': uint8 (batch, 3, {h}, {w}) RGB, the image resized as crop_pct "
                  f"{geo['crop_pct']:g} {geo['interpolation']} {geo['crop_mode']}", markup=False, highlight=False)
    con.print(f"outputs 'probs' (batch, {len(res.meta['classes'])}) and 'pred' (batch); onnxruntime vs torch max abs "
              f"diff {res.max_abs_diff:.2g}", markup=False, highlight=False)
    return 0
