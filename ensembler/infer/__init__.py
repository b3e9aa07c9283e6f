"""Inference engine: TTA plans and views, multi-member batched inference, LogitStore, ONNX.

Public API
----------
parse_tta, TTAPlan, View
    TTA plans as data; views built on the device (``views.py``).
predict_batch, predict_views, merge_views
    Every view of a batch stacked into as few forwards as fit, and merged (``tta.py``).
predict_members, checkpoint_view_logits
    Registry members over a SampleTable (decode once per geometry, per-member
    normalisation, cached logits), as :class:`ensembler.logits.Logits`; one checkpoint's
    per-view logits over some rows (``engine.py``).
LogitStore
    Cached per-checkpoint logits, one :mod:`ensembler.logits` file each (``store.py``).
export_onnx
    ONNX export with a parity check; ``backend="onnx"`` runs through onnxruntime (``onnx.py``).
tta_report, TTAReport, TTAScore
    A TTA plan judged on a family's out-of-fold rows, view by view; writes OOF-TTA logits
    for ``tune-weights`` (``oof_tta.py``).
"""

from .engine import BACKENDS, checkpoint_view_logits, predict_members
from .onnx import OnnxExport, export_onnx
from .oof_tta import TTAReport, TTAScore, tta_report
from .store import CacheWarning, LogitStore, default_cache_dir
from .tta import MERGE_RULES, check_merge, merge_views, predict_batch, predict_views
from .views import TTAError, TTAPlan, View, parse_tta, select_views

__all__ = [
    "BACKENDS", "CacheWarning", "LogitStore", "MERGE_RULES", "OnnxExport", "TTAError", "TTAPlan",
    "View", "check_merge", "checkpoint_view_logits", "default_cache_dir", "export_onnx", "merge_views", "parse_tta",
    "predict_batch", "predict_members", "predict_views", "select_views",
    "TTAReport", "TTAScore", "tta_report",
]
