"""Inference engine: TTA plans and views, multi-member batched inference, LogitStore, ONNX.

Public API
----------
parse_tta, TTAPlan, predict_batch, predict_views, merge_views
    TTA plans as data; views built on the device and stacked into the batch (``tta.py``).
predict_members, MemberLogits
    Registry members over a SampleTable: decode once per geometry, per-member
    normalisation, cached logits (``engine.py``).
LogitStore, save_member_logits, load_member_logits
    Cached per-checkpoint logits and member-logits files (``store.py``).
export_onnx
    ONNX export with a parity check; ``backend="onnx"`` runs through onnxruntime (``onnx.py``).
tta_report, TTAReport, TTAScore
    A TTA plan judged on a family's out-of-fold rows, view by view; writes OOF-TTA logits
    for ``tune-weights`` (``oof_tta.py``).
"""

from .engine import BACKENDS, predict_members, resolve_members
from .onnx import OnnxExport, export_onnx
from .oof_tta import TTAReport, TTAScore, tta_report
from .store import CacheWarning, LogitStore, MemberLogits, default_cache_dir, load_member_logits, save_member_logits
from .tta import MERGE_RULES, TTAError, TTAPlan, View, check_merge, merge_views, parse_tta, predict_batch, predict_views

__all__ = [
    "BACKENDS", "CacheWarning", "LogitStore", "MERGE_RULES", "MemberLogits", "OnnxExport", "TTAError", "TTAPlan",
    "View", "check_merge", "default_cache_dir", "export_onnx", "load_member_logits", "merge_views", "parse_tta",
    "predict_batch", "predict_members", "predict_views", "resolve_members", "save_member_logits",
    "TTAReport", "TTAScore", "tta_report",
]
