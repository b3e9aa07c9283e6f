"""Ensembling on logits: voting, temperature calibration, weight tuning, Recipes."""

from __future__ import annotations

from .voting import VOTE_RULES, VoteResult, check_weights, stack_member_logits, vote

__all__ = ["VOTE_RULES", "VoteResult", "check_weights", "stack_member_logits", "vote"]
