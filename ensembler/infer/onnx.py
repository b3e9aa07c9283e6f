"""ONNX export with a parity check, and the onnxruntime backend of the engine.

:func:`export_onnx` writes ``model.onnx`` next to a checkpoint's weights (atomically: a
temp file that only becomes ``model.onnx`` once its parity with torch is checked), with a
dynamic batch axis (and dynamic height/width for models that accept any size, so crop and
scale views run too). Its sha256, the weights sha256 it came from, the opset and the
measured max abs difference are recorded in ``model.onnx.json`` beside it (and in the
registry entry's ``onnx`` field when the registry's Entry has one).

The engine's ``backend="onnx"`` exports on first use (so ``export-onnx`` is optional) and,
before each use, checks that the recorded weights sha256 is the entry's and that the
``model.onnx`` bytes still hash to the recorded sha256 (:class:`IntegrityError` otherwise).
Sessions use the CUDA provider for a CUDA device (after ``onnxruntime.preload_dlls()``, with
I/O binding on torch's device buffers), else the CPU provider with ``intra_op_num_threads``
set (default ``torch.get_num_threads()``), graph optimisations on (``ORT_ENABLE_ALL``).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .._io import atomic_path, sha256_file, write_json_atomic
from ..errors import EnsemblerError, IntegrityError

__all__ = ["OnnxExport", "export_onnx", "onnx_path", "make_session", "OnnxForward", "load_onnx_forward",
           "DEFAULT_OPSET"]

DEFAULT_OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


@dataclass(frozen=True)
class OnnxExport:
    """What :func:`export_onnx` wrote and measured."""

    entry_id: str
    path: Path
    sha256: str
    opset: int
    max_abs_diff: float
    atol: float


def onnx_path(registry, entry) -> Path:
    """Where the entry's ONNX file lives: ``model.onnx`` in its weights folder.

    When the weights file is not the folder's default ``weights.safetensors`` (two entries
    share a folder), the ONNX file takes the weights file's stem instead.
    """
    weights = registry.path(entry.weights)
    name = "model.onnx" if weights.name == "weights.safetensors" else f"{weights.stem}.onnx"
    return weights.parent / name


def _record_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _read_record(path: Path) -> dict | None:
    try:
        return json.loads(_record_path(path).read_text())
    except (OSError, ValueError):
        return None


def make_session(path, device="cpu", threads: int | None = None):
    """An onnxruntime InferenceSession: CUDA provider on a CUDA device, else CPU with ``threads``."""
    import onnxruntime as ort
    import torch

    device = torch.device(device)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = int(threads or torch.get_num_threads())
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    providers: list = ["CPUExecutionProvider"]
    if device.type == "cuda":
        if hasattr(ort, "preload_dlls"):
            try:
                ort.preload_dlls()
            except Exception as exc:  # noqa: BLE001 - falls back to whatever the loader finds
                warnings.warn(f"onnxruntime.preload_dlls() failed ({exc}); CUDA provider may not load", RuntimeWarning)
        providers = [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
    session = ort.InferenceSession(str(path), sess_options=so, providers=providers)
    if device.type == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        warnings.warn(f"onnxruntime could not use CUDA for {path}; running on the CPU provider", RuntimeWarning)
    return session


class OnnxForward:
    """Callable mapping a float torch batch to torch logits through an onnxruntime session.

    On a CUDA device with the CUDA provider active, inputs and outputs stay on the GPU (I/O
    binding on torch's buffers); otherwise tensors go through numpy on the CPU.
    """

    def __init__(self, session, device="cpu"):
        import torch

        self.session = session
        self.device = torch.device(device)
        self.input_name = session.get_inputs()[0].name
        self.output_name = session.get_outputs()[0].name
        self.num_outputs = session.get_outputs()[0].shape[-1]
        self.on_gpu = self.device.type == "cuda" and "CUDAExecutionProvider" in session.get_providers()

    def __call__(self, x):
        import torch

        x = x.detach().float().contiguous()
        if not self.on_gpu:
            out = self.session.run([self.output_name], {self.input_name: x.cpu().numpy()})[0]
            return torch.from_numpy(out).to(self.device)
        dev_id = x.device.index or 0
        out = torch.empty((x.shape[0], int(self.num_outputs)), dtype=torch.float32, device=x.device)
        binding = self.session.io_binding()
        binding.bind_input(self.input_name, "cuda", dev_id, np.float32, tuple(x.shape), x.data_ptr())
        binding.bind_output(self.output_name, "cuda", dev_id, np.float32, tuple(out.shape), out.data_ptr())
        torch.cuda.current_stream(x.device).synchronize()  # onnxruntime reads on its own stream
        self.session.run_with_iobinding(binding)
        return out


def export_onnx(registry, entry_id, opset: int | None = None, atol: float = 1e-4) -> OnnxExport:
    """Export a registry checkpoint to ONNX next to its weights and check parity with torch.

    Parameters
    ----------
    registry : Registry
    entry_id : str or Entry
    opset : int, optional
        ONNX opset (default 17).
    atol : float
        Largest accepted max-abs difference between onnxruntime (CPU) and torch logits on a
        random batch; above it nothing is written and :class:`IntegrityError` is raised.

    Returns
    -------
    OnnxExport
        Path, sha256, opset and the measured ``max_abs_diff``.

    Examples
    --------
    >>> result = export_onnx(Registry("checkpoints"), "resnet18-fold0")  # doctest: +SKIP
    >>> result.max_abs_diff < 1e-4                                      # doctest: +SKIP
    True
    """
    import torch

    entry = registry.get(entry_id)
    opset = DEFAULT_OPSET if opset is None else int(opset)
    if not 7 <= opset <= 25:
        raise EnsemblerError(f"--opset must be between 7 and 25, got {opset}")
    pre = entry.pre
    h, w = pre.input_size
    model = registry.load_model(entry, device="cpu")
    dynamic = {0: "batch"} if pre.fixed_input_size else {0: "batch", 2: "height", 3: "width"}
    path = onnx_path(registry, entry)
    gen = torch.Generator().manual_seed(0)
    example = torch.randn(2, 3, h, w, generator=gen)
    check = torch.randn(3, 3, h, w, generator=gen)  # another batch size: exercises the dynamic axis
    with atomic_path(path) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation chatter
            torch.onnx.export(model, (example,), str(tmp), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: dynamic, OUTPUT_NAME: {0: "batch"}}, opset_version=opset,
                              do_constant_folding=True, dynamo=False)
        session = make_session(tmp, "cpu")
        got = session.run([OUTPUT_NAME], {INPUT_NAME: check.numpy()})[0]
        with torch.inference_mode():
            want = model(check).float().numpy()
        diff = float(np.max(np.abs(got - want))) if got.shape == want.shape else float("inf")
        if not np.isfinite(diff) or diff > atol:
            raise IntegrityError(
                f"ONNX export of {entry.id!r} does not match torch: max abs diff {diff:.3g} > tolerance "
                f"{atol:g} (shapes {got.shape} vs {want.shape}); {path} was not written")
        digest = sha256_file(tmp)
    import onnxruntime

    record = {
        "entry": entry.id, "weights_sha256": entry.sha256, "onnx_sha256": digest, "file": path.name,
        "opset": opset, "max_abs_diff": diff, "atol": atol, "dynamic_axes": {k: v for k, v in dynamic.items()},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
    }
    write_json_atomic(_record_path(path), record)
    # The registry keeps non-field keys as extras, so the entry itself says which ONNX file
    # belongs to its weights (the sidecar JSON holds the full parity record).
    registry.update(entry.id, onnx={k: record[k] for k in ("file", "onnx_sha256", "weights_sha256", "opset")})
    return OnnxExport(entry.id, path, digest, opset, diff, atol)


def verified_onnx(registry, entry, export_if_missing: bool = True) -> Path:
    """Path of the entry's ONNX file after checking its recorded sha256 (exporting it if absent).

    Raises :class:`IntegrityError` when ``model.onnx`` differs from what was recorded, or when
    it was exported from other weights and ``export_if_missing`` is False.
    """
    path = onnx_path(registry, entry)
    record = _read_record(path)
    stale = record is not None and record.get("weights_sha256") != entry.sha256
    if record is None or not path.exists() or stale:
        if not export_if_missing:
            why = "was exported from other weights" if stale else "is missing"
            raise IntegrityError(f"ONNX file {path} of {entry.id!r} {why}; run `ensembler export-onnx {entry.id}`")
        export_onnx(registry, entry)
        record = _read_record(path)
    digest = sha256_file(path)
    if record is None or digest != record.get("onnx_sha256"):
        recorded = None if record is None else record.get("onnx_sha256")
        raise IntegrityError(f"ONNX file {path} of {entry.id!r} was modified: sha256 {digest} != recorded "
                             f"{recorded}; run `ensembler export-onnx {entry.id}` again")
    return path


def load_onnx_forward(registry, entry, device="cpu", threads: int | None = None,
                      export_if_missing: bool = True) -> OnnxForward:
    """An :class:`OnnxForward` for a registry entry (verified, exported on first use)."""
    path = verified_onnx(registry, entry, export_if_missing=export_if_missing)
    return OnnxForward(make_session(path, device, threads), device)
