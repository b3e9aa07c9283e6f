"""Ensembling on logits: voting, temperature calibration, weight tuning, Recipes.

What ``predict`` needs::

    from ensembler.ensemble import Recipe, vote
    recipe = Recipe.load("recipe.json")
    names = [m.name for m in recipe.active_members]          # run only these models
    pred, probs = recipe.apply({name: logits_n_by_c, ...})    # temperatures, weights, biases
    # or, without a recipe:
    result = vote({name: logits, ...}, rule="hard")           # result.pred, .probs, .tie_rate

What ``tune-weights`` runs (members in, charts and then the recipe on disk)::

    from ensembler.ensemble import tune_recipe
    run = tune_recipe("all", registry="checkpoints", out="recipe.json", metric="f1")
    run.result.rows, run.recipe_path, run.plots
"""

from __future__ import annotations

from .calibration import TemperatureFit, apply_temperature, calibrate, fit_temperature
from .members import (Member, align_members, check_same_split, compose_members, entry_label_space, factor_parent,
                      load_members, load_oof, plan_compositions, registry_members)
from .recipe import RECIPE_VERSION, Recipe, RecipeError, RecipeMember
from .blend import (
    METHODS,
    METRICS,
    BlendFit,
    CaruanaResult,
    caruana_select,
    class_prior_nll,
    fit_blend,
    fit_class_biases,
    member_probabilities,
    no_signal_members,
    scipy_weights,
)
from .choice import Candidate, Decision, choose
from .diversity import pairwise_diversity
from .stacking import StackFit, fit_stack
from .tuning import TuneResult, honest_score, temperature_at_bound, tune_weights
from .tune_run import TuneRun, default_plot_dir, tune_recipe
from .voting import VOTE_RULES, VoteResult, check_weights, stack_member_logits, tie_rate, vote

__all__ = [
    "METHODS",
    "METRICS",
    "RECIPE_VERSION",
    "VOTE_RULES",
    "BlendFit",
    "Candidate",
    "CaruanaResult",
    "Decision",
    "Member",
    "Recipe",
    "StackFit",
    "RecipeError",
    "RecipeMember",
    "TemperatureFit",
    "TuneResult",
    "TuneRun",
    "VoteResult",
    "align_members",
    "apply_temperature",
    "calibrate",
    "caruana_select",
    "check_same_split",
    "class_prior_nll",
    "check_weights",
    "choose",
    "compose_members",
    "default_plot_dir",
    "entry_label_space",
    "factor_parent",
    "fit_blend",
    "fit_stack",
    "fit_class_biases",
    "fit_temperature",
    "honest_score",
    "load_members",
    "load_oof",
    "member_probabilities",
    "plan_compositions",
    "no_signal_members",
    "pairwise_diversity",
    "registry_members",
    "scipy_weights",
    "stack_member_logits",
    "temperature_at_bound",
    "tie_rate",
    "tune_recipe",
    "tune_weights",
    "vote",
]
