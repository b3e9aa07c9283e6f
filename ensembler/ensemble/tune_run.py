"""``tune-weights`` as one call: members in, recipe (and charts) on disk, what was found out.

:func:`tune_recipe` is what the command runs and what a Python user calls to get the same
files: it resolves the members (:func:`~ensembler.ensemble.load_members`), tunes them
(:func:`~ensembler.ensemble.tune_weights`), writes the charts, and writes the recipe
**last**, so a run that fails anywhere (bad members, a tuning error, a chart that cannot be
written, Ctrl-C) leaves no recipe behind (the recipe itself is written atomically). An
existing recipe or chart is refused before any work unless ``overwrite=True``
(:func:`ensembler._io.refuse_existing`, the rule of every ``--out``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from .members import Member, load_members
from .tuning import TuneResult, tune_weights


@dataclass
class TuneRun:
    """What :func:`tune_recipe` left on disk and found.

    Attributes
    ----------
    result : TuneResult
        The comparison table, the decision, the shipped and the tuned recipes.
    recipe_path : Path
        The recipe JSON written (``predict --recipe`` applies it).
    plots : dict name -> Path
        ``weights`` and ``per_class_f1`` PNGs (empty with ``plots=False``).
    members : list of Member
        The aligned members that were tuned.
    """

    result: TuneResult
    recipe_path: Path
    plots: dict = field(default_factory=dict)
    members: list = field(default_factory=list)


def default_plot_dir(out: str | os.PathLike) -> Path:
    """Where the charts of recipe ``out`` go by default: ``<out stem>_plots`` beside it.

    >>> default_plot_dir("runs/recipe.json").as_posix()
    'runs/recipe_plots'
    """
    out = Path(out)
    return out.parent / f"{out.stem}_plots"


def tune_recipe(members: Sequence[str] | str | Sequence[Member] | None = None, *,
                out: str | os.PathLike = "recipe.json", registry=None, oof_files: Sequence = (),
                plots: bool | str | os.PathLike = True, overwrite: bool = False,
                progress: Callable[[str], None] | None = None, **tune_kw) -> TuneRun:
    """Tune an ensemble on OOF logits and write its recipe, charts first and recipe last.

    Parameters
    ----------
    members : "all", names, list of Member, or None
        As :func:`~ensembler.ensemble.load_members` takes them (family names, checkpoint ids,
        OOF file stems, compositions ``a+b+c``), or already loaded members.
    out : path, default "recipe.json"
        The recipe to write.
    registry : str, Path or Registry, optional
    oof_files : sequence of paths
        Raw OOF ``.npz`` files, each a member named by its file stem.
    plots : bool or path, default True
        ``True``: charts in :func:`default_plot_dir`; a path: charts there; ``False``: none.
    overwrite : bool, default False
        Replace an existing recipe and charts; without it they are kept and the call refused
        before any member is read.
    progress : callable, optional
        Called with a short message before each tuning run.
    **tune_kw
        ``method``, ``metric``, ``rounds``, ``temperature``, ``class_bias``, ``honest``, ... of
        :func:`~ensembler.ensemble.tune_weights` (checked before any member is read).

    Returns
    -------
    TuneRun

    Raises
    ------
    ParameterError, LogitError, RegistryError, EnsemblerError (``out`` exists)
        Before anything is written.
    """
    from .blend import check_bias_metric, check_method, check_metric, check_rounds

    check_method(tune_kw.get("method", "caruana"))
    check_metric(tune_kw.get("metric", "f1"))
    check_rounds(tune_kw.get("rounds", 50))
    check_bias_metric(tune_kw.get("class_bias", False), tune_kw.get("metric", "f1"))
    from .._io import refuse_existing
    from .plots import PLOT_NAMES

    out = Path(out)
    plot_dir = None if not plots else default_plot_dir(out) if plots is True else Path(plots)
    refuse_existing(out, overwrite=overwrite)
    if plot_dir is not None:
        refuse_existing([plot_dir / n for n in PLOT_NAMES], overwrite=overwrite, flag="--plots")
    if isinstance(members, Sequence) and not isinstance(members, str) and members \
            and all(isinstance(m, Member) for m in members):
        loaded = list(members)
    else:
        loaded = load_members(members, registry=registry, oof_files=oof_files)
    result = tune_weights(loaded, progress=progress, **tune_kw)
    plot_paths: dict = {}
    if plot_dir is not None:
        from .plots import write_tuning_plots

        plot_paths = write_tuning_plots(result, plot_dir)
    # The recipe goes last: a run that failed anywhere above leaves no recipe behind.
    result.recipe.save(out)
    return TuneRun(result=result, recipe_path=out, plots=plot_paths, members=loaded)
