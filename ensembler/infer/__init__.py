"""Inference engine: TTA plans and views, multi-member batched inference, LogitStore, ONNX.

Public API
----------
parse_tta, TTAPlan, predict_batch, merge_views
    TTA plans as data; views built on the device and stacked into the batch.
"""

from .tta import MERGE_RULES, TTAError, TTAPlan, View, check_merge, merge_views, parse_tta, predict_batch, predict_views

__all__ = ["MERGE_RULES", "TTAError", "TTAPlan", "View", "check_merge", "merge_views", "parse_tta",
           "predict_batch", "predict_views"]
