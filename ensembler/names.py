"""The names users type: every fixed vocabulary of the toolkit, in one torch-free module.

Each tuple is owned by the module that acts on the names (it validates against the tuple
and re-exports it, e.g. ``ensembler.ensemble.VOTE_RULES``); the CLI takes its ``choices=``
from here, so ``ensembler --help`` imports neither torch nor timm. Plain tuples of strings,
in the order help texts list them (the default first where there is one). Imports nothing
but :mod:`ensembler.errors`.

Also here: how ensemble members are named (:func:`member_names`): ``"all"``,
comma-separated names, and compositions ``a+b+c`` of per-factor members.

>>> "flip" in AUGMENT_LEVELS and "auto" in AUGMENTS
True
>>> member_names("a, b+c", all_names=lambda: ["a", "z"])
['a', 'b+c']
"""

from __future__ import annotations

from typing import Callable, Iterable

from .errors import ParameterError

# ---------------------------------------------------------------- data (ensembler.data)
SOURCE_KINDS = ("csv", "folder", "mask", "digits")

# ---------------------------------------------------------------- models and training (ensembler.models, .train)
HEADS = ("flat", "factored", "multilabel")
OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULERS = ("cosine", "cosine-restarts", "step", "none")
MONITORS = ("f1", "acc", "loss")
LOSS_NAMES = ("ce", "focal", "label-smoothing", "f1", "bce", "mix")
AUGMENT_LEVELS = ("standard", "light", "flip", "none")   # what train_transform builds
AUGMENTS = ("auto",) + AUGMENT_LEVELS                    # what --augment takes (auto: by data and regime)
CROPS = ("timm", "full")
REGIMES = ("fine-tune", "from-scratch")
TARGETS = ("mask", "gender", "age")                      # per-factor models of the mask data

# ---------------------------------------------------------------- inference (ensembler.infer)
BACKENDS = ("torch", "onnx")
#: what ``predict --backend`` takes: the engine's backends, or one exported ensemble (ensembler.export)
PREDICT_BACKENDS = BACKENDS + ("onnx-ensemble",)
#: ``export-ensemble --inputs``: one uint8 input, or one per member geometry (ensembler.export)
EXPORT_INPUTS = ("one", "per-geometry")
EXECUTORS = ("local", "ray")                             # where folds and inference shards run
AMP_MODES = ("auto", "fp16", "bf16", "off")
MERGE_RULE_NAMES = ("mean-logits", "mean-probs", "gmean-probs", "max-probs")
#: TTA plan tokens (``ensembler.infer.views``); ``=S`` takes a size, ``scales=`` factors.
TTA_TOKENS = ("none", "hflip", "vflip", "flip", "d4", "center-crop=S", "five-crop=S", "ten-crop=S",
              "scales=F1,F2,...")

# ---------------------------------------------------------------- ensembles (ensembler.ensemble)
VOTE_RULES = ("hard", "soft", "weighted", "gmean", "logits")
TUNING_METHODS = ("caruana", "scipy", "stack")
TUNING_METRICS = ("f1", "acc", "logloss")

# ---------------------------------------------------------------- member names
F1_LABEL_RULES = ("present", "all")                      # macro-F1 over present classes (scikit-learn) or all
FILE_VOTES = ("hard", "soft")                            # vote-files over submission CSVs
TIE_BREAKS = ("smallest", "first")                       # vote-files: smallest class, or the earliest file
LEADERBOARDS = ("public", "private")                     # ledger score boards
ALL_MEMBERS = "all"
COMPOSE_SEP = "+"


def member_names(names: str | Iterable[str], all_names: Callable[[], list[str]]) -> list[str]:
    """Ensemble member names in order, the one rule for every command that takes members.

    Parameters
    ----------
    names : str or iterable of str
        Comma-separated names (a string) or a list of them. A composition ``a+b+c`` stays one
        name; names are not looked up here.
    all_names : callable
        Returns what ``"all"`` stands for (e.g. every registry family); called only when
        ``"all"`` is given. ``"all"`` adds those names not listed before it.

    Returns
    -------
    list of str

    Raises
    ------
    ParameterError
        Nothing given, or a name given twice (``parameter == "members"``); ``all_names`` may
        raise its own errors (an empty registry, say).

    Examples
    --------
    >>> member_names("all", all_names=lambda: ["a", "b"])
    ['a', 'b']
    >>> member_names(["b", "all"], all_names=lambda: ["a", "b"])
    ['b', 'a']
    >>> member_names("a,a", all_names=list)
    Traceback (most recent call last):
    ...
    ensembler.errors.ParameterError: members lists 'a' twice
    """
    if isinstance(names, str):
        items = [s.strip() for s in names.split(",") if s.strip()]
    else:
        items = [str(s).strip() for s in names]
    if not items:
        raise ParameterError("members", "no members given; pass 'all', family names or checkpoint ids")
    out: list[str] = []
    for item in items:
        if item == ALL_MEMBERS:
            out.extend(n for n in all_names() if n not in out)
        elif item in out:
            raise ParameterError("members", f"members lists {item!r} twice")
        else:
            out.append(item)
    return out
