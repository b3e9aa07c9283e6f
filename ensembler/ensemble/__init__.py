"""Ensembling on logits: voting, temperature calibration, weight tuning, Recipes."""

from __future__ import annotations

from .calibration import TemperatureFit, apply_temperature, calibrate, fit_temperature
from .voting import VOTE_RULES, VoteResult, check_weights, stack_member_logits, vote

__all__ = [
    "VOTE_RULES",
    "TemperatureFit",
    "VoteResult",
    "apply_temperature",
    "calibrate",
    "check_weights",
    "fit_temperature",
    "stack_member_logits",
    "vote",
]
