"""Predict: engine -> vote or recipe -> submission + ledger.

:func:`predict` is what ``ensembler predict`` runs:

1. decide which models run: the recipe's active members (weight > 0; a composed member runs
   its per-factor parts), or the ``members`` asked for (``"all"``, family names, checkpoint
   ids, ``a+b+c`` compositions of per-factor members);
2. run them through the engine (:func:`ensembler.infer.predict_members`), which serves
   every checkpoint already in the logit cache with no forward pass;
3. combine: :meth:`Recipe.apply` (temperatures, weights, class biases) or
   :func:`ensembler.ensemble.vote` (``hard``, ``soft``, ``weighted``, ``gmean``, ``logits``);
   the hard vote's tie rate is reported (ties go to the smallest class index);
4. write the submission and append a ledger row (:func:`ensembler.submit.write_submission`)
   recording the recipe hash, every checkpoint with its sha256, the TTA plan, merge rule,
   vote, backend and the data fingerprint; an earlier identical submission is reported.

Scoring a prediction against labels is :mod:`ensembler.evaluate`, which runs a recipe or
members through :func:`predict` and scores each member alone with
:meth:`PredictionResult.member_joint_logits`.

Nothing is written until every input has been validated, so a bad recipe or member leaves
no partial submission or ledger row behind.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from ._io import refuse_existing
from .errors import DataError, EnsemblerError, LogitError, ParameterError
from .labels import LabelSpace
from .age_bands import check_age_bands, member_age_bands  # noqa: F401
from .member_plan import MemberPlan, composed_plan, recipe_plan

__all__ = ["PredictionResult", "check_age_bands", "member_age_bands", "predict"]


# ============================================================================ result
@dataclass
class PredictionResult:
    """What :func:`predict` produced.

    Attributes
    ----------
    ids : ndarray (N,) of str
        Sample ids, in the table's row order.
    pred : ndarray (N,) int64
        Predicted class indices.
    probs : ndarray (N, C) float64
        Blended probabilities (the hard vote: each class's weighted share of the votes).
    label_space : LabelSpace
    vote : str
        The vote rule used (the recipe's when a recipe was given).
    members : list of str
        The ensemble's members in voting order (composed members as ``a+b+c``).
    weights : list of float or None
    member_logits : dict name -> Logits
        What the engine returned for every model that ran (factor parts included); a model
        run under several plans (views of one family chosen separately) is keyed
        ``"<name> [<plan>]"``.
    joint : dict name -> ndarray (N, C)
        Each member's joint logits, as voted (compositions composed, its own plan).
    tie_rate : float or None
        Hard votes only: fraction of rows whose top vote count was shared.
    recipe_hash : str or None
    member_parts : dict name -> list of str
        Composed members' per-factor parts.
    inputs : dict
        What the ledger records about how the prediction was made.
    submission : SubmissionResult or None
        Set when ``out`` was given.
    """

    ids: np.ndarray
    pred: np.ndarray
    probs: np.ndarray
    label_space: LabelSpace
    vote: str
    members: list[str]
    weights: list[float] | None
    member_logits: dict
    tie_rate: float | None
    recipe_hash: str | None
    inputs: dict
    member_parts: dict = field(default_factory=dict)
    table: Any = None
    submission: Any = None
    joint: dict = field(default_factory=dict)

    @property
    def cached(self) -> bool:
        """True when no model forward ran (every member came from the logit cache)."""
        return all(m.meta.get("cached") for m in self.member_logits.values())

    def member_joint_logits(self, name: str) -> np.ndarray:
        """Joint logits ``(N, C)`` of member ``name`` (a composition ``a+b+c``: its parts composed)."""
        if name in self.joint:
            return np.asarray(self.joint[name])
        return _member_joint_logits(name, self.member_parts.get(name) or [], self.member_logits)

    def repeat_message(self) -> str | None:
        """The ledger's note about an earlier identical submission, or None."""
        return None if self.submission is None else self.submission.repeat_message()


# ============================================================================ predict
def predict(table, registry=None, *, members: str | Sequence[str] = "all", vote: str = "soft",
            weights: Sequence[float] | None = None, recipe=None, tta: str | None = None, merge: str | None = None,
            backend: str = "torch", out: str | os.PathLike | None = None, with_probs: bool = False,
            overwrite: bool = False, use_cache: bool = True, batch_size: int = 32, workers: int = 0,
            device: str | None = None, cache_dir: str | os.PathLike | None = None, progress: bool = True,
            ledger: str | os.PathLike | None = None, executor=None) -> PredictionResult:
    """Run registry members over a table, combine them, and optionally write a submission.

    Parameters
    ----------
    table : SampleTable
        The images to predict (labels are not needed).
    registry : Registry, str or Path, optional
        Default ``Registry()`` (``$ENSEMBLER_REGISTRY`` or ``./checkpoints``).
    members : "all", str or list of str
        Family names (mean over the family's folds), checkpoint ids, or ``a+b+c``
        compositions of per-factor members into the joint space. Comma-separated in one
        string is fine. Ignored when ``recipe`` is given (the recipe decides).
    vote : {"hard", "soft", "weighted", "gmean", "logits"}
        Ignored when ``recipe`` is given (the recipe's rule is used).
    weights : sequence of float, optional
        One non-negative weight per member (``weighted`` needs them).
    recipe : Recipe, str or Path, optional
        A recipe from ``tune-weights``: only its members with weight > 0 run; their
        temperatures, weights and class biases are applied. The sha256 it recorded for a
        member must match the registry's weights. A member tuned under a TTA plan (a
        ``tta-report`` file, or views chosen by ``tune-weights --tta``) runs that plan,
        only its views.
    tta, merge : str, optional
        TTA plan and the merge rule over views (see :func:`ensembler.infer.parse_tta`).
        ``None`` (default): each recipe member's recorded plan, else ``none`` /
        ``mean-logits``. Given, they replace every recipe member's plan.
    backend : {"torch", "onnx"}
    out : path, optional
        Submission CSV to write; a ``ledger.jsonl`` row is appended beside it. An existing
        file with different content is kept unless ``overwrite=True``.
    with_probs : bool
        Add ``prob_<class>`` columns (not for the mask-eval layout, whose format is fixed).
    use_cache : bool
        Reuse cached logits (``False`` forces a forward pass).
    batch_size, workers, device, cache_dir, progress, executor
        Passed to the engine (``executor``: ``"ray"`` or a RayExecutor shards rows across Ray actors).
    ledger : path, optional
        Default ``<folder of out>/ledger.jsonl``.

    Returns
    -------
    PredictionResult

    Raises
    ------
    EnsemblerError
        Unknown members, a recipe that does not fit the registry, class maps that differ,
        bad weights, an existing different submission without ``overwrite``. Nothing is
        written in that case.

    Examples
    --------
    >>> from ensembler.data import load_source
    >>> res = predict(load_source("eval/"), "checkpoints", recipe="recipe.json", tta="hflip",
    ...               out="submissions/tuned.csv")  # doctest: +SKIP
    >>> res.submission.path, res.repeat_message()  # doctest: +SKIP
    """
    from .ensemble import Recipe
    from .infer import parse_tta
    from .infer.tta import check_merge

    registry = _as_registry(registry)
    plan = parse_tta(tta)  # a bad plan fails before any model loads
    merge_rule = check_merge(merge if merge is not None else "mean-logits")
    if isinstance(recipe, (str, os.PathLike)):
        recipe = Recipe.load(recipe)
    out = _check_before_any_work(recipe, vote, weights, out, overwrite, ledger, device)
    if recipe is not None:
        mp = recipe_plan(recipe, tta, merge)
    else:
        mp = MemberPlan(registry.member_names(members), rule=vote, plan=plan, merge=merge_rule)
    atoms = mp.atoms()
    resolved = dict(registry.members(atoms))  # RegistryError naming unknown members
    if recipe is not None:
        _check_recipe_against_registry(recipe, resolved)
    else:
        mp = composed_plan(registry, members, mp, resolved)
    check_age_bands(table, {a: resolved[a] for a in atoms})
    w = _check_vote_weights(mp.rule, weights, mp.specs) if recipe is None else None
    mp.check_input_sizes(resolved)
    # Class maps are checked from the registry entries, before any forward: members that predict
    # different classes, a recipe for other classes, labeled data whose classes are not the members'.
    space = mp.label_space(resolved)
    if recipe is not None:
        _check_classes(recipe.classes, space, "recipe")
    table = _with_label_space(table, space)

    outs = _run_engine(table, mp, registry, backend=backend, batch_size=batch_size, workers=workers, device=device,
                       cache_dir=cache_dir, use_cache=use_cache, progress=progress, executor=executor)
    engine_out = _engine_out(outs)
    # Each member's own engine output (its plan's), keyed by the names its parts have.
    own = {s: outs[mp.key(s)] for s in mp.specs}
    ids = np.asarray(table.ids).astype(str)
    joint = {s: _member_joint_logits(mp.source_of[s], mp.parts_of[s], own[s]) for s in mp.specs}
    pred, probs, ties, weights_used = _combine(recipe, mp.rule, joint, w, mp.specs)
    inputs = _inputs_record(table, recipe, mp, resolved, own, engine_out, weights_used, backend, tta, len(ids))
    result = PredictionResult(ids=ids, pred=np.asarray(pred, dtype=np.int64), probs=np.asarray(probs),
                              label_space=space, vote=mp.rule, members=list(mp.specs), weights=weights_used,
                              member_logits=engine_out, tie_rate=ties,
                              recipe_hash=inputs["recipe_hash"], inputs=inputs,
                              member_parts={k: list(v) for k, v in mp.parts_of.items() if v}, table=table,
                              joint=joint)
    if out is not None:
        from .submit import write_submission

        result.submission = write_submission(table, result.pred, out, probs=result.probs, with_probs=with_probs,
                                             inputs=inputs, overwrite=overwrite, ledger=ledger)
    return result



def _check_before_any_work(recipe, vote, weights, out, overwrite, ledger, device):
    """The checks that need no model: vote rule, weights vs recipe, the output file, its ledger, the device."""
    from .device import resolve_device
    from .ensemble.voting import VOTE_RULES

    if recipe is None and vote not in VOTE_RULES:
        raise ParameterError("vote", f"vote must be one of {', '.join(VOTE_RULES)}, got {vote!r}")
    if recipe is not None and weights is not None:
        raise ParameterError("weights", "weights cannot be combined with a recipe (the recipe holds the weights)")
    if out is not None:
        out = Path(out)
        # Before any forward: an existing submission is kept unless --overwrite (the one rule
        # for files a user names), and a ledger that cannot be read fails now, not after inference.
        refuse_existing(out, overwrite=overwrite)
        from .submit import LEDGER_NAME, read_ledger

        read_ledger(ledger if ledger is not None else out.parent / LEDGER_NAME)
    resolve_device(device)  # a bad --device fails before the data is decoded
    return out





def _run_engine(table, mp: MemberPlan, registry, **engine_kw) -> dict[tuple[str, str], dict]:
    """One engine call per distinct (plan, merge): every model of it in one pass.

    The engine decodes once per geometry and reuses cached logits; a recipe of chosen views
    runs each view only where chosen.
    """
    from .infer import predict_members

    outs = {}
    for key, members_g in mp.groups().items():
        outs[key] = predict_members(table, mp.atoms(members_g), registry, tta=mp.runs[members_g[0]][0],
                                    merge=key[1], **engine_kw)
    return outs


def _combine(recipe, rule, joint, w, specs):
    """Predictions, probabilities, hard-vote tie rate and the weights used: the recipe's, or the vote's."""
    from .ensemble import tie_rate, vote as vote_fn

    if recipe is not None:
        pred, probs = recipe.apply(joint)
        return pred, probs, (tie_rate(probs) if rule == "hard" else None), [m.weight for m in recipe.active_members]
    res = vote_fn(joint, rule, weights=w, names=specs)  # LogitError / ParameterError
    return (res.pred, res.probs, res.tie_rate if rule == "hard" else None,
            None if w is None else [float(x) for x in w])


def _inputs_record(table, recipe, mp: MemberPlan, resolved, own, engine_out, weights_used, backend, tta,
                   rows: int) -> dict:
    """What produced the prediction, as the ledger row records it."""
    from .infer import parse_tta

    fingerprint = next(iter(engine_out.values())).meta.get("fingerprint") or table.fingerprint()
    plans = sorted({mp.key(s) for s in mp.specs})
    records = _member_records(mp.specs, mp.parts_of, resolved, mp.source_of)
    for rec in records:
        s = rec["name"]
        rec["tta"], rec["merge"] = mp.key(s)
        rec["cached"] = all(own[s][a].meta.get("cached") for a in mp.parts_of[s] or [mp.source_of[s]])
    return {
        "recipe_hash": recipe.hash() if recipe is not None else None,
        "members": records,
        "vote": mp.rule,
        "weights": weights_used,
        "tta": plans[0][0] if len(plans) == 1 else "per member",
        "merge": plans[0][1] if len(plans) == 1 else "per member",
        "checkpoint_views": int(sum(len(parse_tta(sp)) * len(resolved[a])
                                    for (sp, _), ms in mp.groups().items() for a in mp.atoms(ms))),
        "backend": backend,
        "data_fingerprint": fingerprint,
        "data": table.describe(),
        "rows": int(rows),
        # members whose recorded plan the caller's tta replaced: {name: recorded plan}
        "tta_replaced": {m.name: m.tta for m in (recipe.active_members if recipe is not None else [])
                         if tta is not None and m.tta and parse_tta(m.tta).spec != mp.runs[m.name][0].spec},
    }


def _as_registry(registry):
    from .registry import Registry

    if registry is None or isinstance(registry, (str, os.PathLike)):
        return Registry(registry)
    return registry



def _engine_out(outs: Mapping[tuple, Mapping]) -> dict:
    """Every model's engine output; one run under several plans is keyed ``"<name> [<plan>]"``."""
    seen: dict[str, int] = {}
    for out in outs.values():
        for name in out:
            seen[name] = seen.get(name, 0) + 1
    merged = {}
    for (spec, rule), out in outs.items():
        for name, z in out.items():
            merged[name if seen[name] == 1 else f"{name} [{spec}]"] = z
    return merged


def _check_recipe_against_registry(recipe, resolved: Mapping[str, list]) -> None:
    """A recipe tuned on other weights than the registry holds now would silently mis-weight them."""
    for m in recipe.active_members:
        if m.kind == "file":
            raise EnsemblerError(
                f"recipe member {m.name!r} was tuned from a raw OOF file that names no registry model; predict "
                "runs registry members, so register that model (or tune on registry families, or on the OOF-TTA "
                "file tta-report writes) first")
        have = sorted(e.sha256 for a in (m.parts or (m.source,)) for e in resolved[a])
        if sorted(m.sha256) != have:
            raise EnsemblerError(
                f"recipe member {m.name!r}: the recipe was tuned on weights with sha256 "
                f"{[s[:12] for s in m.sha256]}, the registry now holds {[s[:12] for s in have]}; re-run tune-weights")


def _check_vote_weights(rule: str, weights, specs: Sequence[str]) -> np.ndarray | None:
    from .ensemble import check_weights

    if weights is None:
        if rule == "weighted":
            raise ParameterError("weights", "weights (one per member) or a recipe are needed by vote 'weighted'")
        return None
    return check_weights(weights, len(specs), specs)  # ParameterError naming weights


def _member_joint_logits(spec: str, parts: Sequence[str], engine_out: Mapping) -> np.ndarray:
    """A member's joint logits; a composition ``a+b+c`` sums its factor parts' log-softmax."""
    if not parts:
        return np.asarray(engine_out[spec].logits)
    from .ensemble import compose_members

    return np.asarray(compose_members([engine_out[p] for p in parts], name=spec).logits)




def _check_classes(classes: Sequence[str], space: LabelSpace, what: str) -> None:
    if tuple(classes) != tuple(space.classes):
        raise LogitError(f"the {what} expects classes {list(classes)[:6]}..., the members predict "
                         f"{list(space.classes)[:6]}...")


def _with_label_space(table, space: LabelSpace):
    """The table with the members' label space (an unlabeled CSV has none of its own)."""
    from .data import SampleTable

    if table.label_space is None:
        return SampleTable(table.frame, space, table.source)
    if not table.label_space.same_classes(space):
        labels = table.frame["label"]
        if not labels.notna().any():
            return SampleTable(table.frame, space, table.source)
        # Labeled data read on its own names only the classes it holds (a held-out set may lack a
        # rare class): its labels are re-indexed into the members' classes by name.
        mine = list(table.label_space.classes)
        present = sorted({int(v) for v in labels.dropna()})
        unknown = [mine[k] for k in present if mine[k] not in space.classes]
        if unknown:
            raise DataError(
                f"{table.describe()} has classes the members do not predict: {unknown[:6]} (the members' "
                f"classes are {list(space.classes)[:8]}{'...' if space.num_classes > 8 else ''}); label the "
                "data with the members' class names")
        frame = table.frame.copy()
        index = {k: space.classes.index(mine[k]) for k in present}
        frame["label"] = labels.map(lambda v: index[int(v)] if v is not pd.NA and not pd.isna(v) else v).astype("Int64")
        return SampleTable(frame, space, table.source)
    return table


def _member_records(specs, parts_of, resolved, source_of) -> list[dict]:
    out = []
    for s in specs:
        parts = parts_of.get(s) or [source_of[s]]
        ckpts = [{"id": e.id, "family": e.family, "fold": e.fold, "sha256": e.sha256}
                 for p in parts for e in resolved[p]]
        rec = {"name": s, "checkpoints": ckpts}
        if source_of[s] != s:
            rec["member"] = source_of[s]
        if parts_of.get(s):
            rec["parts"] = list(parts)
        out.append(rec)
    return out
