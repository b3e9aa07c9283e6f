"""``tune-weights``: tune an ensemble on out-of-fold logits, score it honestly, decide what ships.

:func:`tune_weights` runs one tuning (:func:`~ensembler.ensemble.blend.fit_blend`:
temperatures, Caruana or scipy weights, class biases) on every OOF row (the tuned blend and its
*in-sample* score), then again once per fold with that fold held out, scoring each held-out
fold: the *honest* score (:func:`honest_score`). A tuned blend always looks better in-sample
than it is; the honest score is what to compare with a single member or a uniform vote, and
:func:`ensembler.ensemble.choice.choose` does so fold by fold: the recipe ships the tuned blend
only when its paired honest gain over the best simpler candidate exceeds the fold-to-fold noise,
otherwise that simpler candidate.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping, Sequence

import numpy as np

from ..errors import LogitError
from ..metrics import classification_scores, per_class_f1
from .blend import (BlendFit, check_bias_metric, check_method, check_metric, check_rounds, fit_blend)
from .calibration import DEFAULT_T_BOUNDS, TemperatureFit, calibrate
from .stacking import DEFAULT_CS
from .choice import Candidate, Decision, choose
from .diversity import pairwise_diversity
from .members import Member, align_members
from .recipe import Recipe, RecipeMember
from .voting import vote


# ---------------------------------------------------------------------------- the whole job
@dataclass
class TuneResult:
    """Everything ``tune-weights`` found and shows.

    Attributes
    ----------
    recipe : Recipe
        What ships (:attr:`decision`): the tuned blend, or the simpler candidate (one member,
        the hard or the uniform soft vote) when the blend's honest gain over it is inside the
        fold-to-fold noise. ``recipe.scores`` holds its in-sample and honest scores, the
        decision (``"ships"``), every candidate's fold scores and the tuned blend's scores.
    tuned_recipe : Recipe
        The tuned blend (temperatures, weights, class biases), whether it ships or not.
    decision : Decision
        What ships and the one-line reason (:func:`ensembler.ensemble.choice.choose`).
    rows : list of dict
        The comparison table: one row per member (``kind="member"``), the hard vote,
        the uniform soft vote, the tuned blend in-sample and honest. Keys: ``name``, ``kind``,
        ``f1``, ``acc``, ``logloss``, ``honest_mean`` and ``honest_sd`` (the metric over the
        held-out folds), ``ships`` (bool), ``weight``, ``temperature``, ``t_at_bound``,
        ``nll_before``, ``nll_after``, ``ece_before``, ``ece_after``, ``tie_rate``, ``note``
        (missing values are ``None``).
    in_sample : dict
        f1 / acc / logloss of the tuned blend on all OOF rows (flattered: tuned on them).
    honest : dict or None
        The tuned blend's ``{"metric", "mean", "per_fold": {fold: score}, "pooled": {f1, acc,
        logloss}}``; ``None`` when the OOF rows have fewer than two folds.
    candidates : list of Candidate
        Every candidate with its per-fold honest scores (what the decision compared).
    per_class_f1 : dict name -> ndarray (C,)
        Members, ``soft (uniform)``, ``tuned`` and ``tuned (honest)``.
    calibration : list of TemperatureFit or None
    fit : BlendFit
        The in-sample tuning (Caruana history, timings).
    diversity : list of dict
        Every pair of members on the OOF rows: disagreement, error correlation, both wrong
        (:func:`ensembler.ensemble.diversity.pairwise_diversity`).
    """

    recipe: Recipe
    rows: list[dict]
    in_sample: dict
    honest: dict | None
    per_class_f1: dict
    calibration: list
    fit: BlendFit
    timings: dict
    tuned_recipe: Recipe | None = None
    decision: Decision | None = None
    candidates: list = field(default_factory=list)
    diversity: list = field(default_factory=list)


def _as_members(members, labels, folds, names) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray | None, list]:
    """Normalise the ``members`` argument to names, (M, N, C) logits, labels, folds, Member list."""
    if isinstance(members, Sequence) and members and isinstance(members[0], Member):
        aligned = align_members(members)
        ref = aligned[0]
        if labels is None:
            labels = ref.labels
        if folds is None:
            folds = ref.folds
        return [m.name for m in aligned], np.stack([m.logits for m in aligned]), labels, folds, aligned
    if isinstance(members, Mapping):
        names = list(members) if names is None else list(names)
        arrays = [np.asarray(members[k]) for k in members]
    else:
        arrays = list(np.asarray(members)) if isinstance(members, np.ndarray) else [np.asarray(a) for a in members]
        names = [f"member{i}" for i in range(len(arrays))] if names is None else list(names)
    from .voting import stack_member_logits

    stacked, names = stack_member_logits(arrays, names)  # LogitError / ParameterError naming what is wrong
    bad = [n for n, a in zip(names, stacked) if not np.all(np.isfinite(a))]
    if bad:
        raise LogitError(f"non-finite logits (NaN or inf) in member(s) {', '.join(map(repr, bad))}")
    return names, stacked, labels, folds, []


def _scores(y, probs, pred=None) -> dict:
    lp = np.log(np.maximum(probs, 1e-300))
    s = classification_scores(y, lp)
    if pred is not None:  # hard votes: argmax of shares loses the tie rule; use the vote's pred
        from ..metrics import accuracy, macro_f1

        s["f1"] = macro_f1(y, pred, probs.shape[1])
        s["acc"] = accuracy(y, pred)
    return s


def _recipe_member(name, info: Member | None, classes, weight, temperature) -> RecipeMember:
    """A recipe member, with where its logits come from: kind, weights' sha256, factor parts,
    and (tta-report files, per-view members) the registry member and TTA plan behind them."""
    meta = info.meta if info is not None else {}
    member = meta.get("member") or ""
    return RecipeMember(name=name, kind=info.kind if info is not None else "file", classes=classes,
                        weight=float(weight), temperature=float(temperature),
                        sha256=info.sha256 if info is not None else (), parts=info.parts if info is not None else (),
                        member="" if member == name else str(member), tta=meta.get("tta"), merge=meta.get("merge"))


def _recipe_from_fit(names, member_info, classes, fit: BlendFit, metric, method, scores=None) -> Recipe:
    rm = [_recipe_member(name, member_info[i] if member_info else None, classes, fit.weights[i],
                         fit.temperatures[i]) for i, name in enumerate(names)]
    biases = None if fit.class_biases is None else tuple(float(b) for b in fit.class_biases)
    if fit.stack is not None:
        return Recipe(members=tuple(rm), vote="stack", class_biases=biases, metric=metric, method=method,
                      scores=scores or {}, stack=fit.stack.to_dict())
    return Recipe(members=tuple(rm), vote="weighted", class_biases=biases, metric=metric, method=method,
                  scores=scores or {})


def tune_weights(members, labels=None, folds=None, *, names: Sequence[str] | None = None, method: str = "caruana",
                 metric: str = "f1", rounds: int = 50, temperature: bool = True, class_bias: bool = False,
                 honest: bool = True, bias_grid=None, sweeps: int = 3, stack_cs=DEFAULT_CS,
                 progress: Callable[[str], None] | None = None) -> TuneResult:
    """Tune an ensemble on OOF logits and score it in-sample and honestly.

    Parameters
    ----------
    members : list of Member, dict name -> (N, C), or array (M, N, C)
        OOF joint logits; :class:`Member` lists are aligned by id (labels and folds come
        from them unless given).
    labels : array (N,), optional
    folds : array (N,), optional
        OOF fold of each row; the honest score holds each fold out in turn.
    method : {"caruana", "scipy", "stack"}
        ``stack``: a multinomial logistic regression on the members' log-probabilities
        (:mod:`ensembler.ensemble.stacking`), its ``C`` chosen by inner CV over the OOF
        folds of the rows it is fitted on (inside each honest fold: the remaining folds).
    metric : {"f1", "acc", "logloss"}
        What Caruana selects for, the class biases maximise (f1/acc), and the honest score
        reports. ``scipy`` and ``stack`` always minimise log-loss (see the module docstring).
    rounds : int, default 50
        Caruana rounds.
    temperature : bool, default True
        Fit a temperature per member before blending (not for ``stack``: the regression
        scales each member itself).
    class_bias : bool, default False
        Tune per-class biases on the blend's log-probabilities (needs metric f1 or acc).
    honest : bool, default True
        Repeat the whole tuning once per fold with that fold held out.
    progress : callable, optional
        Called with a short message before each tuning run.

    Returns
    -------
    TuneResult

    Notes
    -----
    A member whose temperature-calibrated log-loss is no better than the class prior's
    (:func:`no_signal_members`) carries no information and gets weight 0, with a note in its
    table row. Calibrated, such a member predicts nearly constant probabilities; adding it to
    a blend changes almost nothing, so greedy selection would otherwise pad the ensemble with
    it (and report a large weight on noise) whenever adding a real member unbalanced the
    blend. The rule runs inside every honest-score fold as part of the tuning.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> y = rng.integers(0, 3, 600); folds = np.arange(600) % 3
    >>> good = np.eye(3)[y] * 2 + rng.normal(size=(600, 3))
    >>> noise = rng.normal(size=(600, 3))
    >>> res = tune_weights({"good": good, "noise": noise}, y, folds, rounds=10, temperature=False)
    >>> res.recipe.weights.tolist()
    [1.0, 0.0]
    >>> sorted(res.honest["per_fold"])
    [0, 1, 2]
    """
    check_method(method)
    check_metric(metric)
    rounds = check_rounds(rounds)
    check_bias_metric(class_bias, metric)
    names, logits, labels, folds, info = _as_members(members, labels, folds, names)
    m, n, c = logits.shape
    y, folds = _checked_labels_and_folds(labels, folds, n, c)
    classes = tuple(info[0].label_space.classes) if info and info[0].label_space is not None else tuple(
        str(i) for i in range(c))
    kw = dict(method=method, metric=metric, rounds=rounds, temperature=temperature, class_bias=class_bias,
              bias_grid=bias_grid, sweeps=sweeps, stack_cs=stack_cs)
    say = progress or (lambda msg: None)
    timings: dict = {}

    # -------- baselines: members, hard vote, uniform soft vote (raw logits, nothing tuned)
    t0 = time.perf_counter()
    rows, per_class, calib, hard, soft, soft_scores = _baselines(names, logits, y, temperature)
    timings["baselines_s"] = time.perf_counter() - t0

    # -------- in-sample tuning on every row
    say(f"tuning on all {n} OOF rows")
    t0 = time.perf_counter()
    fit = fit_blend(logits, y, folds=folds, **kw)
    timings["tune_s"] = time.perf_counter() - t0
    tuned_recipe = _recipe_from_fit(names, info, classes, fit, metric, method)
    pred, probs = tuned_recipe.apply(dict(zip(names, logits)))
    in_sample = _scores(y, probs)
    per_class["tuned"] = per_class_f1(y, pred, c)

    # -------- honest score: the whole tuning again with each fold held out
    fold_values = np.unique(folds) if folds is not None else np.array([])
    t0 = time.perf_counter()
    held = None
    if honest and len(fold_values) >= 2:
        held = honest_score(logits, y, folds, names=names, member_info=info, classes=classes, progress=say, **kw)
        per_class["tuned (honest)"] = per_class_f1(y, held["probs"].argmax(1), c)
    timings["honest_s"] = time.perf_counter() - t0
    honest_res = None if held is None else {k: held[k] for k in ("metric", "mean", "per_fold", "pooled")}

    # -------- what ships: candidates compared fold by fold on the honest score
    candidates = _candidates(names, logits, y, folds if held is not None else None, metric, hard, soft, held,
                             class_bias and fit.class_biases is not None, method)
    simple = [cd for cd in candidates if cd.kind in ("member", "hard", "soft")]
    decision = choose(simple, [cd for cd in candidates if cd.kind.startswith("tuned")], metric)
    shipped, shipped_in, shipped_honest = _shipped(decision, names, info, classes, calib, tuned_recipe, fit, metric,
                                                   method, logits, y, held, candidates)
    scores = {"in_sample": shipped_in, "honest": shipped_honest, "soft_uniform": soft_scores,
              "rows": n, "folds": [int(f) for f in fold_values], "ships": decision.to_dict(),
              "candidates": {cd.name: {"kind": cd.kind, "mean": _finite_or_none(cd.mean()), "per_fold": dict(cd.per_fold)}
                             for cd in candidates},
              "tuned": {"in_sample": in_sample, "honest": honest_res}}
    recipe = replace(shipped, scores=scores)
    tuned_recipe = replace(tuned_recipe, scores=dict(scores, in_sample=in_sample, honest=honest_res))

    _annotate_member_rows(rows[:m], fit, temperature)
    rows.extend(_tuned_rows(method, fit, in_sample, honest_res, held, len(fold_values)))
    _attach_honest_columns(rows, candidates, decision)
    return TuneResult(recipe=recipe, rows=rows, in_sample=in_sample, honest=honest_res, per_class_f1=per_class,
                      calibration=calib, fit=fit, timings=timings, tuned_recipe=tuned_recipe, decision=decision,
                      candidates=candidates, diversity=pairwise_diversity(logits, y, names))


def _checked_labels_and_folds(labels, folds, n: int, c: int):
    """The OOF labels as int64 in 0..c-1 and the folds as an (n,) array (or None), checked."""
    if labels is None:
        raise LogitError("tuning needs labels: the OOF members carry none and none were given")
    y = np.asarray(labels)
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
        raise LogitError(f"labels must be {n} integers (one per OOF row), got {y.dtype} {y.shape}")
    y = y.astype(np.int64)
    if n == 0:
        raise LogitError("no OOF rows to tune on")
    if y.min() < 0 or y.max() >= c:
        raise LogitError(f"labels outside 0..{c - 1}: the members have {c} classes")
    if folds is not None:
        folds = np.asarray(folds)
        if folds.shape != (n,):
            raise LogitError(f"folds must have one entry per OOF row ({n}), got shape {folds.shape}")
    return y, folds


def _baselines(names, logits, y, temperature: bool):
    """Table rows of every member, the hard vote and the uniform soft vote (nothing tuned)."""
    c = logits.shape[2]
    rows: list[dict] = []
    per_class: dict[str, np.ndarray] = {}
    calib: list = []
    for i, name in enumerate(names):
        s = classification_scores(y, logits[i])
        fitcal: TemperatureFit | None = calibrate(logits[i], y) if temperature else None
        calib.append(fitcal)
        rows.append(_row(name, "member", s, temperature=fitcal))
        per_class[name] = per_class_f1(y, logits[i].argmax(1), c)
    hard = vote(logits, "hard", names=names)
    rows.append(_row("hard vote", "hard", _scores(y, hard.probs, hard.pred), tie_rate=hard.tie_rate,
                     logloss=None))
    soft = vote(logits, "soft", names=names)
    soft_scores = _scores(y, soft.probs)
    rows.append(_row("soft vote (uniform)", "soft", soft_scores))
    per_class["soft (uniform)"] = per_class_f1(y, soft.pred, c)
    return rows, per_class, calib, hard, soft, soft_scores


def _annotate_member_rows(member_rows, fit: BlendFit, temperature: bool) -> None:
    """Each member's tuned weight and temperature, with a note when it carries no signal."""
    for i, r in enumerate(member_rows):
        r["weight"] = float(fit.weights[i])
        r["temperature"] = float(fit.temperatures[i]) if fit.stack is None else None
        r["t_at_bound"] = bool(temperature and fit.stack is None
                               and temperature_at_bound(fit.temperatures[i], DEFAULT_T_BOUNDS))
        notes = []
        if i in fit.no_signal:
            nll, prior = fit.no_signal[i]
            notes.append(f"no signal: calibrated log-loss {nll:.3f} >= class prior {prior:.3f}; "
                         "left out of the blend")
        if r["t_at_bound"]:
            notes.append(f"T at its search bound {fit.temperatures[i]:.3g}: calibrated, this member's "
                         "probabilities are near-flat (little signal)")
        r["note"] = "; ".join(notes) or None


def _tuned_rows(method, fit: BlendFit, in_sample, honest_res, held, n_folds: int) -> list[dict]:
    """The tuned blend's table rows: in-sample (flattered), honest, honest without class biases."""
    note = "flattered: tuned on these rows"
    if fit.stack is not None:
        note += (f"; logistic regression C={fit.stack.C:g} ({fit.stack.c_chosen_by}); weight = share of |coef|"
                 + ("" if fit.stack.converged else "; did not converge"))
    rows = [_row(f"tuned {method} (in-sample)", "tuned", in_sample, note=note)]
    if honest_res is None:
        return rows + [_row(f"tuned {method} (honest)", "honest", {}, note="needs OOF folds (>= 2) to estimate")]
    rows.append(_row(f"tuned {method} (honest, {n_folds}-fold)", "honest", honest_res["pooled"],
                     note=f"fold mean {honest_res['metric']} {honest_res['mean']:.4f}"))
    if "pooled_nobias" in held:
        rows.append(_row(f"tuned {method}, no class biases (honest)", "honest-nobias", held["pooled_nobias"]))
    return rows


def _attach_honest_columns(rows, candidates, decision) -> None:
    """Each row's fold-mean honest score, its spread, and whether it ships.

    The in-sample tuned row shows no honest score: it is flattered.
    """
    tuned_names = [cd.name for cd in candidates if cd.kind.startswith("tuned")]
    row_candidate = {"hard": "hard vote", "soft": "soft vote (uniform)", "honest": tuned_names[-1],
                     "honest-nobias": tuned_names[0]}
    folds_of = {cd.name: cd for cd in candidates}
    for r in rows:
        cd = folds_of.get(r["name"] if r["kind"] == "member" else row_candidate.get(r["kind"], ""))
        vals = list(cd.per_fold.values()) if cd is not None else []
        r["honest_mean"] = float(np.mean(vals)) if vals else None
        r["honest_sd"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
        r["ships"] = cd is not None and cd.name == decision.name


def temperature_at_bound(t: float, bounds=DEFAULT_T_BOUNDS, rtol: float = 1e-3) -> bool:
    """Whether a fitted temperature ended (within ``rtol`` on the log scale) at a search bound."""
    lt = np.log(float(t))
    return bool(min(abs(lt - np.log(bounds[0])), abs(lt - np.log(bounds[1]))) < rtol)


def honest_score(logits: np.ndarray, labels, folds, *, names, member_info=(), classes=(), progress=None,
                 **fit_kw) -> dict:
    """The whole tuning repeated with each fold held out, scored on the held-out fold.

    Returns ``{"metric", "mean", "per_fold", "pooled", "probs"}`` (the held-out fold's blend
    probabilities, row-aligned), plus ``"per_fold_nobias"``/``"pooled_nobias"`` when class
    biases are tuned (the same fits applied without them).
    """
    say = progress or (lambda msg: None)
    metric = fit_kw.get("metric", "f1")
    method = fit_kw.get("method", "caruana")
    y = np.asarray(labels, dtype=np.int64)
    m, n, c = logits.shape
    held_probs = np.zeros((n, c))
    held_nobias = np.zeros((n, c)) if fit_kw.get("class_bias") else None
    per_fold, per_fold_nobias = {}, {}
    for f in np.unique(folds):
        test = folds == f
        say(f"honest score: tuning without fold {f} ({int(test.sum())} rows held out)")
        fit_f = fit_blend(logits[:, ~test], y[~test], folds=np.asarray(folds)[~test], **fit_kw)
        rec_f = _recipe_from_fit(names, member_info, classes, fit_f, metric, method)
        test_logits = dict(zip(names, logits[:, test]))
        _, probs_f = rec_f.apply(test_logits)
        held_probs[test] = probs_f
        per_fold[int(f)] = _scores(y[test], probs_f)[metric]
        if held_nobias is not None:
            _, probs_nb = replace(rec_f, class_biases=None).apply(test_logits)
            held_nobias[test] = probs_nb
            per_fold_nobias[int(f)] = _scores(y[test], probs_nb)[metric]
    out = {"metric": metric, "mean": float(np.mean(list(per_fold.values()))), "per_fold": per_fold,
           "pooled": _scores(y, held_probs), "probs": held_probs}
    if held_nobias is not None:
        out.update(per_fold_nobias=per_fold_nobias, pooled_nobias=_scores(y, held_nobias))
    return out


def _finite_or_none(x):
    """JSON has no NaN: a mean over no honest folds is recorded as null."""
    return None if x is None or not np.isfinite(x) else float(x)


def _candidates(names, logits, y, folds, metric, hard, soft, held, with_bias: bool, method: str) -> list[Candidate]:
    """Every candidate with its metric on each held-out fold (no folds: empty fold scores)."""
    def per_fold(pred=None, probs=None):
        if folds is None:
            return {}
        out = {}
        for f in np.unique(folds):
            t = folds == f
            if probs is not None:
                out[int(f)] = _scores(y[t], probs[t], None if pred is None else pred[t])[metric]
        return out

    from ..metrics import softmax

    cands = [Candidate(name, "member", per_fold(probs=softmax(logits[i]))) for i, name in enumerate(names)]
    cands.append(Candidate("soft vote (uniform)", "soft", per_fold(probs=soft.probs)))
    if metric != "logloss" and len(names) > 1:  # a hard vote's shares have no log-loss
        cands.append(Candidate("hard vote", "hard", per_fold(pred=hard.pred, probs=hard.probs)))
    if held is not None:
        if with_bias:
            cands.append(Candidate(f"tuned {method}, no class biases", "tuned", dict(held["per_fold_nobias"])))
            cands.append(Candidate(f"tuned {method} + class biases", "tuned+bias", dict(held["per_fold"])))
        else:
            cands.append(Candidate(f"tuned {method}", "tuned", dict(held["per_fold"])))
    else:
        cands.append(Candidate(f"tuned {method}", "tuned+bias" if with_bias else "tuned", {}))
    return cands


def _shipped(decision, names, info, classes, calib, tuned_recipe: Recipe, fit: BlendFit, metric, method, logits, y,
             held, candidates) -> tuple[Recipe, dict, dict | None]:
    """The recipe of the chosen candidate, with its in-sample and honest scores."""
    m = len(names)
    cand = next(cd for cd in candidates if cd.name == decision.name)

    def plain(weights, temps, rule):
        members = tuple(_recipe_member(nm, info[i] if info else None, classes, weights[i], temps[i])
                        for i, nm in enumerate(names))
        return Recipe(members=members, vote=rule, class_biases=None, metric=metric, method=None)

    if cand.kind == "member":
        i = names.index(cand.name)
        temps = [cf.temperature if cf is not None else 1.0 for cf in calib]
        recipe = plain(np.eye(m)[i], temps, "weighted")
    elif cand.kind in ("soft", "hard"):
        recipe = plain(np.ones(m), np.ones(m), cand.kind)
    elif cand.kind == "tuned" and tuned_recipe.class_biases is not None:
        recipe = replace(tuned_recipe, class_biases=None)
    else:
        recipe = tuned_recipe
    pred, probs = recipe.apply(dict(zip(names, logits)))
    in_sample = _scores(y, probs, pred if recipe.vote == "hard" else None)
    if held is None:
        return recipe, in_sample, None
    if cand.kind == "tuned+bias" or (cand.kind == "tuned" and "pooled_nobias" not in held):
        pooled = held["pooled"]
    elif cand.kind == "tuned":
        pooled = held["pooled_nobias"]
    else:
        pooled = in_sample  # nothing fitted: its OOF score is already honest
    honest = {"metric": metric, "mean": cand.mean(), "per_fold": dict(cand.per_fold), "pooled": pooled}
    return recipe, in_sample, honest


def _row(name, kind, scores, *, temperature: TemperatureFit | None = None, tie_rate=None, note=None, **over):
    row = {"name": name, "kind": kind, "f1": scores.get("f1"), "acc": scores.get("acc"),
           "logloss": scores.get("logloss"), "weight": None, "temperature": None, "nll_before": None,
           "nll_after": None, "ece_before": None, "ece_after": None, "tie_rate": tie_rate, "note": note}
    if temperature is not None:
        row.update(temperature=temperature.temperature, nll_before=temperature.nll_before,
                   nll_after=temperature.nll_after, ece_before=temperature.ece_before,
                   ece_after=temperature.ece_after)
    row.update(over)
    return row


