"""The graph of an exported ensemble, as torch modules that trace to ONNX (plumbing of :mod:`ensembler.export`).

Views, geometry and resizes are lists of plain ops (``flip``, ``rot90``, ``slice``,
``matrices``) on a float ``(B, 3, H, W)`` tensor; a resize is two constant matrices, what
``F.interpolate`` does along each axis (it is linear), so it exports as MatMul and matches
torch to float precision (the legacy ONNX exporter has no antialiased resize).
"""

from __future__ import annotations

from .errors import EnsemblerError


class ExportError(EnsemblerError, ValueError):
    """A recipe (or part of it) that cannot become one ONNX graph; the message says why."""

def resize_matrix(n_in: int, n_out: int, mode: str, antialias: bool):
    """(n_out, n_in) matrix doing what ``F.interpolate`` does along one axis (it is linear)."""
    import torch
    import torch.nn.functional as F

    basis = torch.eye(n_in, dtype=torch.float64).reshape(n_in, 1, n_in, 1)
    kw = {} if mode == "nearest" else {"align_corners": False, "antialias": antialias}
    out = F.interpolate(basis, size=(n_out, 1), mode=mode, **kw)
    return out.reshape(n_in, n_out).T.contiguous().float()


def resize_op(size_in, size_out, mode: str, antialias: bool) -> tuple:
    return ("matrices", resize_matrix(size_in[0], size_out[0], mode, antialias),
            resize_matrix(size_in[1], size_out[1], mode, antialias))


def view_ops(view, size: tuple[int, int], resize_to) -> tuple[list[tuple], tuple[int, int]]:
    """A TTA view as exportable ops on a (B, 3, H, W) float tensor, and its output size.

    Mirrors :func:`ensembler.infer.views.apply_view` (flips, rot90, ttach's crop anchors,
    bilinear scales, the antialiased resize back of fixed-input-size models).
    """
    from .infer.views import View

    ops, (h, w) = [], size
    for op in view.ops:
        kind = op[0]
        if kind in ("hflip", "vflip"):
            ops.append(("flip", 3 if kind == "hflip" else 2))
        elif kind == "rot90":
            ops.append(("rot90", op[1] % 4))
        elif kind == "crop":
            _, anchor, ch, cw = op
            top = {"lt": 0, "rt": 0, "lb": h - ch, "rb": h - ch}.get(anchor, h // 2 - ch // 2)
            left = {"lt": 0, "lb": 0, "rt": w - cw, "rb": w - cw}.get(anchor, w // 2 - cw // 2)
            ops.append(("slice", top, top + ch, left, left + cw))
        elif kind == "scale":
            ops.append(resize_op((h, w), View((op,)).output_size((h, w)), "bilinear", False))
        h, w = View((op,)).output_size((h, w))
    if resize_to is not None and (h, w) != tuple(resize_to):
        shrink = h > resize_to[0] or w > resize_to[1]
        ops.append(resize_op((h, w), tuple(resize_to), "bilinear", shrink))
        h, w = tuple(resize_to)
    return ops, (h, w)


def apply_ops(ops, x, mats):
    """Run :func:`view_ops` ops; ``mats`` maps an op index to its (rows, cols) buffers."""
    for i, op in enumerate(ops):
        if op[0] == "flip":
            x = x.flip(op[1])
        elif op[0] == "rot90":  # torch.rot90(x, k, dims=(2, 3)) with exportable ops
            x = {1: lambda t: t.flip(3).transpose(2, 3), 2: lambda t: t.flip(2).flip(3),
                 3: lambda t: t.transpose(2, 3).flip(3)}.get(op[1], lambda t: t)(x)
        elif op[0] == "slice":
            x = x[:, :, op[1]:op[2], op[3]:op[4]]
        else:
            rows, cols = mats[i]
            x = rows @ x @ cols.T
    return x


def graph_modules():
    """The torch modules of the graph (defined lazily: no torch import at module import)."""
    from torch import nn

    return _checkpoint_class(nn), _ensemble_class(nn)


def _checkpoint_class(nn):
    """The module class of one checkpoint: geometry, normalisation, TTA views, joint logits, merge."""
    import torch

    class Checkpoint(nn.Module):
        """One checkpoint: geometry, normalisation, TTA views, joint logits, merge."""

        def __init__(self, model, entry, plan, merge, geometry):
            super().__init__()
            self.model, self.head, self.labels, self.merge = model, entry.head, entry.labels, merge
            self.geometry, self.views, self.source = geometry, [], 0
            self.register_buffer("mean", 255.0 * torch.tensor(entry.pre.mean).view(1, 3, 1, 1))
            self.register_buffer("std", 255.0 * torch.tensor(entry.pre.std).view(1, 3, 1, 1))
            resize_to = entry.pre.input_size if entry.pre.fixed_input_size else None
            for v, view in enumerate(plan.views):
                ops, size = view_ops(view, entry.pre.input_size, resize_to)
                _register_matrices(self, f"v{v}", ops)
                self.views.append((ops, size))
            if geometry is not None:
                _register_matrices(self, "g", geometry)

        def _mats(self, prefix, ops):
            return {i: (getattr(self, f"{prefix}_{i}_rows"), getattr(self, f"{prefix}_{i}_cols"))
                    for i, op in enumerate(ops) if op[0] == "matrices"}

        def forward(self, x):  # x: float (B, 3, H, W) in 0..255
            if self.geometry is not None:
                x = apply_ops(self.geometry, x, self._mats("g", self.geometry))
                x = x.round().clamp(0.0, 255.0)  # the engine's geometry gives uint8 levels
            x = (x - self.mean) / self.std
            views = _view_outputs(self.model, x, self.views, self._mats)  # (B, V, K)
            return _merged_joint(views, len(self.views), self.head, self.labels, self.merge)

    return Checkpoint


def _register_matrices(module, prefix: str, ops) -> None:
    """Register each resize op's (rows, cols) matrices as buffers ``{prefix}_{i}_rows/_cols``."""
    for i, op in enumerate(ops):
        if op[0] == "matrices":
            module.register_buffer(f"{prefix}_{i}_rows", op[1])
            module.register_buffer(f"{prefix}_{i}_cols", op[2])


def _view_outputs(model, x, views, mats):
    """(B, V, K) model outputs of every view; views of one size stacked in the batch: one forward."""
    import torch

    groups: dict = {}
    for v, (_, size) in enumerate(views):
        groups.setdefault(size, []).append(v)
    per_view = [None] * len(views)
    for idx in groups.values():
        stacked = torch.cat([apply_ops(views[v][0], x, mats(f"v{v}", views[v][0])) for v in idx], dim=0)
        out = model(stacked)
        out = out.reshape(len(idx), -1, out.shape[-1])
        for j, v in enumerate(idx):
            per_view[v] = out[j]
    return torch.stack(per_view, dim=1)


def _merged_joint(views, n_views: int, head, labels, merge):
    """Per-view outputs (B, V, K) as joint logits, merged over the views by ``merge``."""
    from .infer.tta import merge_views
    from .models import joint_logits

    k = views.shape[-1]
    joint = joint_logits(views.reshape(-1, k), head, labels)
    return merge_views(joint.reshape(-1, n_views, joint.shape[-1]), merge)


def _ensemble_class(nn):
    """The module class of the recipe: members (mean over folds, composed parts), temperatures, vote, biases."""
    import torch

    class Ensemble(nn.Module):
        """Members (mean over folds, composed parts), temperatures, the vote, class biases."""

        def __init__(self, checkpoints, members, recipe):
            super().__init__()
            self.checkpoints = nn.ModuleList(checkpoints)
            self.members = members  # [(temperature, weight, [[checkpoint index, ...] per part]) ...]
            self.rule = recipe.vote
            biases = recipe.class_biases
            self.register_buffer("biases", None if biases is None else torch.tensor(biases, dtype=torch.float32))
            if self.rule == "stack":  # the fitted regression on floored log-softmax features
                _register_stack(self, recipe.stack)

        def forward(self, *images):
            xs = [im.float() for im in images]
            outs = [c(xs[c.source]) for c in self.checkpoints]
            zs, ws = _member_logits(outs, self.members, self.rule)
            if self.rule == "stack":
                probs = _stack_probs(zs, self.coef, self.intercept, self.known, self.biases)
            else:
                probs = _vote_probs(self.rule, zs, ws, self.biases)
            return probs, probs.argmax(dim=-1)

    return Ensemble


def _register_stack(module, st: dict) -> None:
    """Register a stack's coefficients, intercept and known-class mask (unseen classes -inf) as buffers."""
    import torch

    module.register_buffer("coef", torch.tensor(st["coef"], dtype=torch.float32).T.contiguous())
    module.register_buffer("intercept", torch.tensor(st["intercept"], dtype=torch.float32))
    known = torch.full((len(st["intercept"]),), float("-inf"))
    known[list(st["classes"])] = 0.0
    module.register_buffer("known", known)  # classes the stack never saw get -inf


def _member_logits(outs, members, rule: str):
    """Each member's logits (mean over its folds; composed parts joined) over its temperature, and its weight."""
    import torch

    from .labels import joint_from_factor_logprobs

    zs, ws = [], []
    for temperature, weight, parts in members:
        logits = [torch.stack([outs[i] for i in part]).mean(dim=0) for part in parts]
        z = logits[0] if len(logits) == 1 else joint_from_factor_logprobs(
            [torch.log_softmax(p, dim=-1) for p in logits])
        zs.append(z / temperature)
        ws.append(1.0 if rule == "soft" else weight)
    return zs, ws


def _stack_probs(zs, coef, intercept, known, biases):
    """The stack's probabilities: its regression on floored log-softmax features, then the class biases."""
    import torch

    from .ensemble.stacking import LOG_FLOOR

    feats = torch.cat([torch.log_softmax(z, dim=-1).clamp_min(LOG_FLOOR) for z in zs], dim=-1)
    logp = torch.log_softmax(feats @ coef + intercept + known, dim=-1)
    if biases is not None:
        logp = logp + biases
    return torch.softmax(logp, dim=-1)


def _vote_probs(rule: str, zs, ws, biases):
    """The vote's probabilities (hard, soft/weighted, gmean or logits) over member logits, then the class biases."""
    import torch

    total = sum(ws)
    if rule == "hard":
        num = zs[0].shape[-1]
        classes = torch.arange(num, device=zs[0].device)
        counts = sum(w * (z.argmax(dim=-1, keepdim=True) == classes).float() for z, w in zip(zs, ws))
        probs = counts / counts.sum(dim=-1, keepdim=True)
    elif rule in ("soft", "weighted"):
        probs = sum(w * torch.softmax(z, dim=-1) for z, w in zip(zs, ws)) / total
    elif rule == "gmean":
        probs = torch.softmax(sum(w * torch.log_softmax(z, dim=-1) for z, w in zip(zs, ws)) / total, dim=-1)
    else:  # logits
        probs = torch.softmax(sum(w * z for z, w in zip(zs, ws)) / total, dim=-1)
    if biases is not None:
        probs = torch.softmax(torch.log(probs) + biases, dim=-1)
    return probs


def member_geometry(src, pre) -> list | None:
    """Ops taking an image at geometry ``src`` to ``pre``'s geometry (None when they are equal)."""
    if src.geometry_key == pre.geometry_key:
        return None
    if pre.interpolation == "lanczos":
        raise ExportError(f"a member's geometry ({pre.input_size}, lanczos) differs from the input's "
                          f"{src.input_size}; lanczos resampling has no exact tensor form here")
    h, w = src.input_size
    target = pre.resize_size()
    if isinstance(target, int):  # shorter side, aspect kept (torchvision's rule)
        short, long_ = (h, w) if h <= w else (w, h)
        other = int(target * long_ / short)
        target = (target, other) if h <= w else (other, target)
    ops = [resize_op((h, w), target, pre.interpolation, True)]
    ch, cw = pre.input_size
    if ch > target[0] or cw > target[1]:
        raise ExportError(f"member geometry {pre.input_size} needs a crop larger than its resize {target}")
    top, left = int(round((target[0] - ch) / 2.0)), int(round((target[1] - cw) / 2.0))  # torchvision's centre
    ops.append(("slice", top, top + ch, left, left + cw))
    return ops
