"""The whole recipe as one ONNX graph: uint8 images in, blended class probabilities out.

:func:`export_ensemble` traces one torch module that does everything ``predict --recipe``
does after decoding, and writes it as ``ensemble.onnx`` (atomically, only once onnxruntime
agrees with the torch module on a random batch):

1. input ``images``: **uint8, NCHW, RGB, at the input geometry** recorded in the metadata
   (``inputs[0]``: size, crop_pct, interpolation, crop_mode) -- i.e. the image decoded, resized
   and centre-cropped as that Preprocess does (:func:`ensembler.preprocess.Preprocess.geometry_transform`).
   The geometry is the one most active checkpoints share (ties: the first member's). Batch is dynamic.
   With ``inputs="per-geometry"`` the graph takes one input per distinct member geometry
   instead (``images``, ``images_1``, ...; each recorded in ``inputs``), decoded as the engine
   decodes them, so the result equals the engine's to float precision;
2. per checkpoint: its own geometry when it differs from its input's (``inputs="one"``: resize
   with the member's interpolation, antialiased, rounded to uint8 levels, then timm's centre
   crop: a resize *of the already-cropped input*, so close to but not equal to the engine, which
   resizes the original image; measured up to 8e-4 on probabilities between resnet18's and
   efficientnet_b0's timm geometries), its mean/std, its TTA views as tensor ops (flips, rot90,
   fixed crops, scales; resizes are constant matrices, exact in float), its head's joint
   logits per view and the merge rule over views;
3. per member: the mean over its fold checkpoints; a composed member's per-factor parts
   become joint log-probabilities; then the temperature;
4. the recipe's vote (soft, weighted, gmean, logits, hard; ties to the smallest class) with
   its weights, or its stack (the logistic regression on floored log-softmax features), and
   its class biases; outputs ``probs`` (N, C) float32 and ``pred`` (N,) int64.

The model's metadata (``ensembler`` key, JSON) records the recipe hash, every checkpoint's
weights sha256, the TTA plan and merge rule, the input geometry and the classes.
:func:`predict_onnx` decodes a SampleTable at that geometry, runs the graph through
onnxruntime and writes the same submission and ledger row as ``predict --recipe``.

What cannot be exported is refused with the reason (:class:`ExportError`): recipe members
tuned from raw OOF files, vote rules or methods this module does not know, weights the
registry no longer holds, geometries that need lanczos resampling.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ._ensemble_graph import ExportError, graph_modules, member_geometry
from ._io import atomic_path, refuse_existing, sha256_file
from .errors import EnsemblerError

__all__ = ["ExportError", "EnsembleExport", "export_ensemble", "read_ensemble_meta", "predict_onnx",
           "EXPORT_VOTES", "INPUT_NAME"]

FORMAT = 1
META_KEY = "ensembler"
INPUT_NAME, PROBS_NAME, PRED_NAME = "images", "probs", "pred"
EXPORT_VOTES = ("soft", "weighted", "gmean", "logits", "hard", "stack")
EXPORT_METHODS = (None, "caruana", "scipy", "stack")
DEFAULT_OPSET = 18


@dataclass(frozen=True)
class EnsembleExport:
    """What :func:`export_ensemble` wrote and measured."""

    path: Path
    sha256: str
    recipe_hash: str
    checkpoints: int
    views: int
    input_size: tuple[int, int]
    max_abs_diff: float
    meta: dict


# ----------------------------------------------------------------------------- export
def _geometry_of(pre) -> dict:
    return {"input_size": list(pre.input_size), "crop_pct": pre.crop_pct, "interpolation": pre.interpolation,
            "crop_mode": pre.crop_mode}


def _joint_space(recipe, resolved) -> dict:
    """The label space the blend predicts in (a composed member's: its parts' parent space)."""
    first = recipe.active_members[0]
    labels = resolved[(first.parts or (first.name,))[0]][0].labels
    return labels.meta["factor_of"] if first.parts and "factor_of" in labels.meta else labels.to_dict()


def _check_exportable(recipe, resolved) -> None:
    if recipe.vote not in EXPORT_VOTES:
        raise ExportError(f"recipe vote {recipe.vote!r} cannot be exported (exportable: {', '.join(EXPORT_VOTES)})")
    if recipe.method not in EXPORT_METHODS:
        raise ExportError(f"recipe method {recipe.method!r} cannot be exported: only weight blends "
                          f"({', '.join(m for m in EXPORT_METHODS if m)} or hand-made) become one graph here")
    for m in recipe.active_members:
        if m.kind == "file":
            raise ExportError(f"recipe member {m.name!r} was tuned from a raw OOF file: there is no model to export")
    for m in recipe.active_members if resolved is not None else ():
        have = sorted(e.sha256 for p in (m.parts or (m.name,)) for e in resolved[p])
        if m.sha256 and sorted(m.sha256) != have:
            raise ExportError(f"recipe member {m.name!r} was tuned on weights {[s[:12] for s in m.sha256]}, "
                              f"the registry holds {[s[:12] for s in have]}; re-run tune-weights")


def export_ensemble(recipe, registry=None, out="ensemble.onnx", *, tta="none", merge: str = "mean-logits",
                    inputs: str = "one", opset: int = DEFAULT_OPSET, atol: float = 1e-4,
                    overwrite: bool = False) -> EnsembleExport:
    """Write a recipe, its members' checkpoints and a TTA plan as one ONNX graph.

    Parameters
    ----------
    recipe : Recipe, str or Path
    registry : Registry, str or Path, optional
    out : path
        The ``.onnx`` file; an existing file is kept unless ``overwrite``.
    tta, merge : str
        TTA plan and merge rule, as ``predict --tta/--merge`` take them.
    inputs : {"one", "per-geometry"}
        One uint8 input at the most common member geometry (members at another geometry are
        resized from it inside the graph: close to the engine, not equal), or one input per
        distinct geometry (equal to the engine; the caller decodes once per geometry).
    opset : int
    atol : float
        Largest accepted max-abs difference of probabilities between onnxruntime and the torch
        module on a random batch; above it nothing is written (:class:`ExportError`).

    Returns
    -------
    EnsembleExport

    Examples
    --------
    >>> res = export_ensemble("recipe.json", "checkpoints", "ensemble.onnx", tta="hflip")  # doctest: +SKIP
    >>> res.input_size, res.max_abs_diff < 1e-4  # doctest: +SKIP
    ((224, 224), True)
    """
    import onnx  # noqa: F401 - a missing onnx fails here, before any model loads

    from .ensemble import Recipe
    from .infer.tta import check_merge, parse_tta
    from .registry import Registry

    recipe = Recipe.load(recipe) if isinstance(recipe, (str, os.PathLike)) else recipe
    registry = registry if hasattr(registry, "members") else Registry(registry)
    plan, merge = parse_tta(tta), check_merge(merge)
    out = Path(out)
    refuse_existing(out, overwrite=overwrite)  # before any model loads
    _check_exportable(recipe, None)
    _check_one_plan(recipe, plan, merge)
    atoms = [p for m in recipe.active_members for p in (m.parts or (m.name,))]
    resolved = dict(registry.members(list(dict.fromkeys(atoms))))
    _check_exportable(recipe, resolved)
    entries = list({e.id: e for a in dict.fromkeys(atoms) for e in resolved[a]}.values())
    sources = _input_sources(entries, plan, inputs)
    net = _ensemble_module(recipe, registry, resolved, entries, sources, plan, merge)
    names = [INPUT_NAME] + [f"{INPUT_NAME}_{k}" for k in range(1, len(sources))]
    meta = _export_meta(recipe, resolved, plan, merge, names, sources)
    digest, diff = _write_checked(net, out, names, sources, meta, opset=opset, atol=atol)
    return EnsembleExport(out, digest, meta["recipe_hash"], len(entries), len(plan), tuple(sources[0].input_size),
                          diff, meta)


def _check_one_plan(recipe, plan, merge) -> None:
    """Refuse recipe members tuned with a TTA plan or merge rule other than the export's."""
    from .infer.tta import parse_tta

    for m in recipe.active_members:  # recipes may carry per-member plans (tune-weights --tta)
        if m.member and m.member != m.name:
            raise ExportError(f"recipe member {m.name!r} runs registry member {m.member!r} with its own views; "
                              "per-member TTA plans are not exported yet")
        if (m.tta is not None and parse_tta(m.tta).spec != plan.spec) or (m.merge is not None and m.merge != merge):
            raise ExportError(f"recipe member {m.name!r} was tuned with TTA {m.tta!r} ({m.merge}); export with "
                              f"--tta {m.tta} --merge {m.merge or merge} (one plan for every member)")


def _input_sources(entries, plan, inputs: str) -> list:
    """The Preprocess of each graph input: the most shared geometry first (``inputs="one"``: only it)."""
    for e in entries:
        plan.check_input(e.pre.input_size)
    if inputs not in ("one", "per-geometry"):
        raise EnsemblerError(f"inputs must be 'one' or 'per-geometry', got {inputs!r}")
    keys = [e.pre.geometry_key for e in entries]
    distinct = sorted(dict.fromkeys(keys), key=lambda k: -keys.count(k))  # most shared first; ties: first seen
    sources = [entries[keys.index(k)].pre for k in distinct]
    return sources[:1] if inputs == "one" else sources


def _ensemble_module(recipe, registry, resolved, entries, sources, plan, merge):
    """The torch module of the whole recipe (every checkpoint loaded on the CPU), refusing over 1.9 GB of weights."""
    Checkpoint, Ensemble = graph_modules()
    index = {e.id: i for i, e in enumerate(entries)}
    nets = []
    for e in entries:
        k = next((j for j, p in enumerate(sources) if p.geometry_key == e.pre.geometry_key), 0)
        net_ = Checkpoint(registry.load_model(e, device="cpu"), e, plan, merge, member_geometry(sources[k], e.pre))
        net_.source = k
        nets.append(net_)
    size = sum(t.numel() * t.element_size() for n_ in nets for t in n_.model.state_dict().values())
    if size > 1.9e9:  # protobuf's 2 GiB limit: one .onnx file cannot hold more
        raise ExportError(f"the recipe's {len(entries)} checkpoints hold {size / 1e9:.1f} GB of weights; one ONNX "
                          "file holds under 2 GB (protobuf) and this export writes no external data files: drop "
                          "weight-0 or weak members, or ship fewer folds")
    members = [(m.temperature, m.weight, [[index[e.id] for e in resolved[p]] for p in (m.parts or (m.name,))])
               for m in recipe.active_members]
    return Ensemble(nets, members, recipe).eval()


def _export_meta(recipe, resolved, plan, merge, names, sources) -> dict:
    """The ``ensembler`` metadata the model carries: recipe hash, checkpoints, TTA plan, inputs, classes."""
    import torch

    return {
        "format": FORMAT, "recipe_hash": recipe.hash(), "vote": recipe.vote, "tta": plan.spec, "merge": merge,
        "views": len(plan), "inputs": [{"name": n, **_geometry_of(p)} for n, p in zip(names, sources)],
        "classes": list(recipe.classes),
        "label_space": _joint_space(recipe, resolved),
        "members": [{"name": m.name, "weight": m.weight, "temperature": m.temperature,
                     **({"parts": list(m.parts)} if m.parts else {}),
                     "checkpoints": [{"id": e.id, "family": e.family, "fold": e.fold, "sha256": e.sha256}
                                     for p in (m.parts or (m.name,)) for e in resolved[p]]}
                    for m in recipe.active_members],
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__},
    }


def _write_checked(net, out: Path, names, sources, meta: dict, *, opset: int, atol: float) -> tuple[str, float]:
    """Trace ``net`` to ``out`` with ``meta`` (atomically, only when onnxruntime agrees within ``atol``); (sha256, diff)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    example = tuple(torch.randint(0, 256, (2, 3, *p.input_size), generator=gen, dtype=torch.uint8) for p in sources)
    check = tuple(torch.randint(0, 256, (3, 3, *p.input_size), generator=gen, dtype=torch.uint8) for p in sources)
    with atomic_path(out) as tmp:
        _trace(net, example, tmp, names, opset)
        _stamp_meta(tmp, meta)
        diff = _max_diff(net, tmp, names, check)
        if not np.isfinite(diff) or diff > atol:
            raise ExportError(f"the exported graph does not match the torch ensemble: max abs diff {diff:.3g} > "
                              f"{atol:g}; {out} was not written")
        return sha256_file(tmp), diff


def _trace(net, example, path, names, opset: int) -> None:
    """Export ``net`` traced on ``example`` to ``path`` (legacy exporter, dynamic batch)."""
    import torch

    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer chatter
        torch.onnx.export(net, example, str(path), input_names=names,
                          output_names=[PROBS_NAME, PRED_NAME], opset_version=int(opset),
                          dynamic_axes={**{n: {0: "batch"} for n in names}, PROBS_NAME: {0: "batch"},
                                        PRED_NAME: {0: "batch"}},
                          do_constant_folding=True, dynamo=False)


def _stamp_meta(path, meta: dict) -> None:
    """Write ``meta`` into the ONNX file's metadata under :data:`META_KEY`."""
    import onnx

    model = onnx.load(str(path))
    entry = model.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(meta, sort_keys=True)
    model.producer_name = "ensembler"
    onnx.save(model, str(path))


def _max_diff(net, path, names, check) -> float:
    """Largest abs difference of probabilities between onnxruntime on ``path`` and ``net`` on ``check``."""
    import torch

    from .infer.onnx import make_session

    got = make_session(path, "cpu").run([PROBS_NAME], {n: x.numpy() for n, x in zip(names, check)})[0]
    with torch.no_grad():
        want = net(*check)[0].numpy()
    return float(np.max(np.abs(got - want))) if got.shape == want.shape else float("inf")


# ----------------------------------------------------------------------------- running it
def read_ensemble_meta(path) -> dict:
    """The ``ensembler`` metadata of an exported ensemble; :class:`ExportError` naming the file otherwise."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"--model {path} does not exist")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - onnx raises DecodeError and others on a bad file
        raise ExportError(f"--model {path} is not an ONNX file ({type(exc).__name__}: {exc})") from None
    props = {p.key: p.value for p in model.metadata_props}
    if META_KEY not in props:
        raise ExportError(f"--model {path} was not written by `ensembler export-ensemble` (no '{META_KEY}' metadata)")
    meta = json.loads(props[META_KEY])
    if meta.get("format") != FORMAT:
        raise ExportError(f"--model {path} has export format {meta.get('format')!r}; this ensembler reads {FORMAT}")
    return meta


def predict_onnx(table, model, *, out=None, with_probs: bool = False, overwrite: bool = False, batch_size: int = 32,
                 workers: int = 0, device=None, threads: int | None = None, progress: bool = True, ledger=None):
    """Run an exported ensemble over a SampleTable; optionally write the submission and a ledger row.

    Images are decoded once per input geometry the model records and sent to onnxruntime
    in runs of ``8 // views`` images on a CPU (8 model inputs per forward, the engine's CPU
    chunk; the whole batch on CUDA). Returns a
    :class:`~ensembler.predict.PredictionResult` (``member_logits`` is empty: the members
    live inside the graph); the ledger row records the recipe hash, every checkpoint's
    sha256, the TTA plan and the model file's sha256, with backend ``onnx-ensemble``.
    """
    import torch

    from .data import SampleTable
    from .device import resolve_device
    from .ensemble import tie_rate
    from .errors import DataError
    from .infer.engine import make_decode_loader, raise_decode_errors
    from .infer.onnx import make_session
    from .infer.tta import default_chunk_size
    from .labels import LabelSpace
    from .predict import PredictionResult
    from .preprocess import Preprocess
    from .progress import Ticker

    meta = read_ensemble_meta(model)
    if out is not None:
        refuse_existing(out, overwrite=overwrite)  # before any image is decoded
    if len(table) == 0:
        raise DataError("the data has no images: nothing to predict")
    if int(batch_size) < 1:
        raise EnsemblerError(f"batch_size must be >= 1, got {batch_size}")
    dev = resolve_device(device)
    session = make_session(model, dev, threads)
    geos = [(g["name"], Preprocess(**{k: v for k, v in g.items() if k != "name"})) for g in meta["inputs"]]
    space = LabelSpace.from_dict(meta["label_space"])
    if list(space.classes) != list(meta["classes"]):
        space = LabelSpace(tuple(meta["classes"]))
    if table.label_space is None or not table.label_space.same_classes(space):
        if table.label_space is not None and table.frame["label"].notna().any():
            raise DataError(f"{table.describe()} has classes {list(table.label_space.classes)[:6]}..., the model "
                            f"predicts {list(space.classes)[:6]}...: they are not the same task")
        table = SampleTable(table.frame, space, table.source)
    ids = np.asarray(table.ids).astype(str)
    per_forward = default_chunk_size(dev)  # images per model forward: all on CUDA, 8 on a CPU
    chunk = int(batch_size) if per_forward is None else max(1, per_forward // max(1, int(meta.get("views", 1))))
    loaders = [make_decode_loader(list(table.paths), pre, int(batch_size), int(workers), pin=False)
               for _, pre in geos]  # same order and batches: zipped, one batch of every geometry at a time
    probs = []
    with Ticker("onnx-ensemble", total=len(ids), unit="images", enabled=progress) as tick, torch.inference_mode():
        for batches in zip(*loaders):
            feed = {}
            for (name, _), (_, images, errors) in zip(geos, batches):
                raise_decode_errors(errors)
                feed[name] = images.numpy()
            n = len(batches[0][1])
            for start in range(0, n, chunk):  # a CPU is faster per image on small forwards (see the engine)
                probs.append(session.run([PROBS_NAME], {k: v[start:start + chunk] for k, v in feed.items()})[0])
            tick.advance(n)
    probs = np.concatenate(probs).astype(np.float64)
    pred = probs.argmax(axis=1).astype(np.int64)  # first maximum: ties go to the smallest class index
    ties = tie_rate(probs) if meta["vote"] == "hard" else None
    inputs = {
        "recipe_hash": meta["recipe_hash"], "members": [
            {"name": m["name"], "checkpoints": m["checkpoints"], **({"parts": m["parts"]} if "parts" in m else {})}
            for m in meta["members"]],
        "vote": meta["vote"], "weights": [m["weight"] for m in meta["members"]], "tta": meta["tta"],
        "merge": meta["merge"], "backend": "onnx-ensemble",
        "model": {"path": str(model), "sha256": sha256_file(model)},
        "data_fingerprint": table.fingerprint(), "data": table.describe(), "rows": int(len(ids)),
    }
    result = PredictionResult(ids=ids, pred=pred, probs=probs, label_space=space, vote=meta["vote"],
                              members=[m["name"] for m in meta["members"]], weights=inputs["weights"],
                              member_logits={}, tie_rate=ties, recipe_hash=meta["recipe_hash"], inputs=inputs,
                              member_parts={m["name"]: m["parts"] for m in meta["members"] if "parts" in m},
                              table=table)
    if out is not None:
        from .submit import write_submission

        result.submission = write_submission(table, pred, out, probs=probs, with_probs=with_probs, inputs=inputs,
                                             overwrite=overwrite, ledger=ledger)
    return result
