"""Per-checkpoint preprocessing: input size, resize/crop rule, interpolation, mean/std.

Swin, EfficientNet and ResNeXt are trained with different sizes, crop fractions and
normalisation; one shared pipeline silently mis-normalises some of them. A Preprocess is
resolved from timm's pretrained config for the architecture, can be overridden, and is
stored with every checkpoint, so inference uses exactly what training used.

Geometry (resize + crop, done on the decoded PIL image, giving uint8 pixels) is kept apart
from normalisation (done on the device on float tensors). That split lets the inference
engine decode once per geometry and normalise per member.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Sequence

from .errors import EnsemblerError

_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")

#: Largest input side in pixels (``--img-size``, a registry entry's ``input_size``, TTA crops and
#: scaled views). The strongest mask-task models ran at 224-384; 2048 leaves room for
#: high-resolution work while a typo (``--img-size 100000``) is refused instead of asking the
#: kernel for hundreds of gigabytes.
MAX_INPUT_SIZE = 2048


def check_input_size(value, flag: str = "--img-size") -> None:
    """:class:`EnsemblerError` naming ``flag`` unless every side is an integer in 8..MAX_INPUT_SIZE."""
    sides = [value] if isinstance(value, (int, float, str)) else list(value)
    for side in sides:
        if isinstance(side, bool) or not isinstance(side, int) or not 8 <= side <= MAX_INPUT_SIZE:
            raise EnsemblerError(f"{flag} must be an integer from 8 to {MAX_INPUT_SIZE} pixels per side, "
                                 f"got {value!r}")


@dataclass(frozen=True)
class Preprocess:
    """How images are turned into a model's input tensor.

    Parameters
    ----------
    input_size : (int, int)
        Model input height and width.
    crop_pct : float
        Eval transform resizes the shorter side to ``size / crop_pct`` then centre-crops
        ``input_size`` (timm's rule). ``1.0`` means resize straight to the input size's scale.
    interpolation : str
        One of nearest, bilinear, bicubic, lanczos.
    mean, std : (float, float, float)
        Normalisation applied to [0, 1] RGB.
    crop_mode : str
        ``center`` (timm's default) or ``squash`` (resize both sides, no crop).
    fixed_input_size : bool
        The architecture only accepts ``input_size`` (Swin, ViT): TTA crops and scales are
        resized back to it.
    """

    input_size: tuple[int, int] = (224, 224)
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    crop_mode: str = "center"
    fixed_input_size: bool = False

    def __post_init__(self):
        object.__setattr__(self, "input_size", tuple(int(s) for s in self.input_size))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        object.__setattr__(self, "crop_pct", float(self.crop_pct))
        if len(self.input_size) != 2 or min(self.input_size) < 1:
            raise EnsemblerError(f"input_size must be (H, W) with positive sizes, got {self.input_size}")
        if max(self.input_size) > MAX_INPUT_SIZE:
            raise EnsemblerError(f"input_size {self.input_size} is over the limit of {MAX_INPUT_SIZE} pixels per side")
        if not 0.0 < self.crop_pct <= 1.0:
            raise EnsemblerError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.interpolation not in _INTERPOLATIONS:
            raise EnsemblerError(f"interpolation must be one of {_INTERPOLATIONS}, got {self.interpolation!r}")
        if self.crop_mode not in ("center", "squash"):
            raise EnsemblerError(f"crop_mode must be 'center' or 'squash', got {self.crop_mode!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise EnsemblerError(f"mean/std must be 3 values with std > 0, got {self.mean}/{self.std}")

    # ------------------------------------------------------------------ (de)serialise
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocess":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if "input_size" in known and len(known["input_size"]) == 3:  # timm's (C, H, W)
            known["input_size"] = tuple(known["input_size"][1:])
        return cls(**known)

    @classmethod
    def from_timm(cls, arch: str, img_size: int | Sequence[int] | None = None, **overrides) -> "Preprocess":
        """Resolve from timm's pretrained config of ``arch`` (no download), then apply overrides.

        ``img_size`` sets the input size; everything else keeps the architecture's values.
        """
        import timm
        from timm.data import resolve_data_config

        try:
            cfg = timm.get_pretrained_cfg(arch)
        except Exception:  # noqa: BLE001 - timm raises several types for unknown names
            cfg = None
        if cfg is None and not timm.is_model(arch):
            raise EnsemblerError(f"unknown timm architecture {arch!r} (see timm.list_models())")
        cfg_dict = cfg.to_dict() if cfg is not None else {}
        data_cfg = resolve_data_config(pretrained_cfg=cfg_dict) if cfg_dict else {}
        base = dict(
            input_size=tuple(data_cfg.get("input_size", (3, 224, 224))[1:]),
            crop_pct=data_cfg.get("crop_pct", 0.875),
            interpolation=data_cfg.get("interpolation", "bicubic"),
            mean=data_cfg.get("mean", (0.485, 0.456, 0.406)),
            std=data_cfg.get("std", (0.229, 0.224, 0.225)),
            crop_mode=data_cfg.get("crop_mode", "center") if data_cfg.get("crop_mode") in ("center", "squash") else "center",
            fixed_input_size=bool(cfg_dict.get("fixed_input_size", False)),
        )
        if img_size is not None:
            base["input_size"] = _as_hw(img_size)
        base.update({k: v for k, v in overrides.items() if v is not None})
        if "input_size" in overrides and overrides["input_size"] is not None:
            base["input_size"] = _as_hw(overrides["input_size"])
        return cls(**base)

    def with_size(self, img_size: int | Sequence[int]) -> "Preprocess":
        return replace(self, input_size=_as_hw(img_size))

    # ------------------------------------------------------------------ geometry
    @property
    def geometry_key(self) -> tuple:
        """Members with equal geometry share one decode (normalisation may differ)."""
        return (self.input_size, round(self.crop_pct, 6), self.interpolation, self.crop_mode)

    def resize_size(self) -> tuple[int, int] | int:
        """What timm's eval transform resizes to before the centre crop."""
        h, w = self.input_size
        if self.crop_mode == "squash":
            return (math.floor(h / self.crop_pct), math.floor(w / self.crop_pct))
        if h == w:
            return math.floor(h / self.crop_pct)  # shorter side, keeps aspect ratio
        return (math.floor(h / self.crop_pct), math.floor(w / self.crop_pct))

    def geometry_transform(self):
        """torchvision transform: PIL RGB -> uint8 tensor (3, H, W), resized and centre-cropped."""
        from torchvision.transforms import v2 as T
        import torch

        interp = getattr(T.InterpolationMode, self.interpolation.upper())
        return T.Compose(
            [
                T.PILToTensor(),
                T.Resize(self.resize_size(), interpolation=interp, antialias=True),
                T.CenterCrop(self.input_size),
                T.ToDtype(torch.uint8),
            ]
        )

    def normalize(self, images_uint8):
        """uint8 (B, 3, H, W) tensor on any device -> normalised float32 tensor."""
        import torch

        x = images_uint8.float().div_(255.0)
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return x.sub_(mean).div_(std)


def _as_hw(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, (int,)):
        return (int(size), int(size))
    size = tuple(int(s) for s in size)
    if len(size) == 3:
        size = size[1:]
    if len(size) != 2:
        raise EnsemblerError(f"image size must be S or (H, W), got {size}")
    return size  # type: ignore[return-value]
