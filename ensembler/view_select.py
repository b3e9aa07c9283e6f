"""TTA views chosen on out-of-fold data, per member: ``tune-weights --tta PLAN``.

A view that helps one model hurts another (colour jitter hurt while a centre crop helped,
on the mask task), and ttach or pytorch-toolbelt only merge every view of a plan. Greedy
Policy Search (Molchanov et al., UAI 2020) picks views greedily on validation log-likelihood;
here every (member, view) pair is an ensemble member of its own and the blend's own selection
(Caruana or scipy, :func:`ensembler.ensemble.tune_weights`) chooses among them:

1. for every family, :func:`ensembler.infer.tta_report` runs each fold checkpoint over its own
   validation rows with every view of the plan (per-view logits cached in the LogitStore,
   so a re-tune runs no forward);
2. each view of each family becomes an OOF member ``<family>@<view>``, whose recorded plan is
   that one view (``PLAN@VIEW``, :func:`ensembler.infer.select_views`);
3. the tuning selects and weights the pairs; its honest score repeats the selection with each
   fold held out, so the selection is inside the nested estimate;
4. the same tuning over each family with *all* views merged (``mean-logits``) is the
   comparison: what the plan gives without choosing.

The recipe's members are the chosen pairs (weight > 0), each naming its registry family and
its view; ``predict --recipe`` runs each family with only its chosen views.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .errors import EnsemblerError
from .logits import Logits

__all__ = ["ViewTuning", "check_view_plan", "chosen_views", "view_members", "tune_views"]

VIEW_SEP = "@"


@dataclass
class ViewTuning:
    """What :func:`tune_views` found.

    Attributes
    ----------
    result : TuneResult
        The tuning over (family, view) pairs: what ships.
    all_views : TuneResult or None
        The same tuning over each family with every view merged (the plan without choosing).
    members : list of Logits
        The per-view OOF members tuned over.
    merged : list of Logits
        Each family's all-views member.
    plan : str
        The plan's canonical spec.
    chosen : dict family -> list of view names
        The views with weight > 0 in the shipped recipe.
    """

    result: object
    all_views: object
    members: list
    merged: list
    plan: str
    chosen: dict


def check_view_plan(tta):
    """The parsed plan, or an error when it has fewer than two views (nothing to choose between)."""
    from .infer import parse_tta

    plan = parse_tta(tta)
    if len(plan) < 2:
        raise EnsemblerError(f"--tta {plan.spec!r} has one view: there is nothing to choose between "
                             "(try hflip, flip, or hflip+center-crop=S)")
    return plan


def view_members(table, families: Sequence[str], registry, *, tta, backend: str = "torch", batch_size: int = 32,
                 workers: int = 0, device=None, cache_dir=None, use_cache: bool = True,
                 progress: bool = True) -> tuple[list[Logits], list[Logits], str]:
    """Per-view OOF members of each family, and each family with every view merged.

    Returns ``(per_view, merged, plan_spec)``: ``per_view`` holds one member per (family, view),
    named ``<family>@<view>``, with meta ``kind="family"``, ``member`` (the family), ``sha256``
    (its fold weights), ``tta`` (``PLAN@VIEW``) and ``merge``; ``merged`` one member per family
    (``tta`` = the plan, views merged by mean of logits).
    """
    from .ensemble import registry_members
    from .infer import select_views, tta_report

    plan = check_view_plan(tta)
    per_view, merged = [], []
    for fam in families:
        if "+" in fam:
            raise EnsemblerError(f"member {fam!r}: --tta chooses views of registry families; compose per-factor "
                                 "families after choosing their views, or tune the composition without --tta")
        base = registry_members(registry, [fam])[0]  # LogitError naming a family without OOF logits
        if base.kind != "family":
            raise EnsemblerError(f"member {fam!r} is a single checkpoint; --tta needs a train-folds family (each "
                                 "fold checkpoint is run over its own validation rows)")
        rep = tta_report(table, fam, registry, tta=plan, merge="mean-logits", backend=backend, batch_size=batch_size,
                         workers=workers, device=device, cache_dir=cache_dir, use_cache=use_cache, progress=progress)
        shas = [rep.meta["sha256"][rep.checkpoints[f]] for f in sorted(rep.checkpoints)]
        common = {"kind": "family", "member": fam, "sha256": shas, "merge": "mean-logits",
                  "source": str(rep.source)}
        for j, view in enumerate(rep.views):
            per_view.append(Logits(rep.ids, rep.view_logits[:, j], label_space=base.label_space, labels=rep.labels,
                                   folds=rep.folds, name=f"{fam}{VIEW_SEP}{view}",
                                   meta={**common, "tta": select_views(plan, [view]).spec, "view": view}))
        merged.append(Logits(rep.ids, rep.merged_logits["mean-logits"], label_space=base.label_space,
                             labels=rep.labels, folds=rep.folds, name=fam, meta={**common, "tta": plan.spec}))
    return per_view, merged, plan.spec


def tune_views(table, families: Sequence[str] | str, registry, *, tta, compare: bool = True,
               engine: dict | None = None, **tune_kw) -> ViewTuning:
    """Choose TTA views per family on OOF data with the blend's own selection; score it honestly.

    Parameters
    ----------
    table : SampleTable
        The data the families were trained on (every OOF id must be in it).
    families : "all", str or list of str
        Registry families (comma-separated in one string is fine).
    registry : Registry, str or Path
    tta : str
        The plan whose views are candidates (e.g. ``"hflip+center-crop=224"``).
    compare : bool
        Also tune over each family with all views merged (:attr:`ViewTuning.all_views`).
    engine : dict, optional
        ``backend``, ``batch_size``, ``workers``, ``device``, ``cache_dir``, ``use_cache``,
        ``progress`` for :func:`view_members`.
    **tune_kw
        Passed to :func:`ensembler.ensemble.tune_weights` (``method``, ``metric``, ...).

    Returns
    -------
    ViewTuning
    """
    from .ensemble import align_members, tune_weights
    from .registry import Registry

    reg = registry if hasattr(registry, "families") else Registry(registry)
    names = reg.member_names(families)
    per_view, merged, spec = view_members(table, names, reg, tta=tta, **(engine or {}))
    result = tune_weights(align_members(per_view), **tune_kw)
    all_views = tune_weights(align_members(merged), **tune_kw) if compare else None
    return ViewTuning(result, all_views, per_view, merged, spec, chosen_views(result.recipe))


def chosen_views(recipe) -> dict:
    """``{family: [view, ...]}``: the views a recipe's active members run (weight > 0)."""
    chosen: dict = {}
    for m in recipe.active_members:
        chosen.setdefault(m.source, []).append(m.name.split(VIEW_SEP, 1)[1] if VIEW_SEP in m.name else m.name)
    return chosen
