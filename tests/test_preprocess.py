import numpy as np
import pytest
from PIL import Image

from ensembler.errors import EnsemblerError
from ensembler.preprocess import Preprocess


def test_from_timm_differs_per_architecture():
    swin = Preprocess.from_timm("swin_large_patch4_window12_384")
    eff = Preprocess.from_timm("efficientnet_b3")
    assert swin.input_size == (384, 384) and swin.fixed_input_size and swin.crop_pct == 1.0
    assert eff.input_size == (288, 288) and not eff.fixed_input_size
    assert Preprocess.from_timm("test_resnet").mean == (0.5, 0.5, 0.5)
    assert Preprocess.from_timm("efficientnet_b3", img_size=32).input_size == (32, 32)
    with pytest.raises(EnsemblerError, match="unknown timm architecture 'nope'"):
        Preprocess.from_timm("nope")


def test_roundtrip_and_validation():
    p = Preprocess.from_timm("resnext50_32x4d", img_size=(64, 48))
    assert Preprocess.from_dict(p.to_dict()) == p
    assert Preprocess.from_dict({"input_size": [3, 32, 32]}).input_size == (32, 32)
    with pytest.raises(EnsemblerError, match="crop_pct"):
        Preprocess(crop_pct=1.5)
    with pytest.raises(EnsemblerError, match="interpolation"):
        Preprocess(interpolation="cubic-ish")


def test_geometry_and_normalize_match_timm_eval_transform():
    from timm.data import create_transform

    p = Preprocess.from_timm("test_resnet", img_size=40)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (57, 73, 3), dtype=np.uint8))
    ours = p.normalize(p.geometry_transform()(img).unsqueeze(0))[0]
    timm_t = create_transform(input_size=(3, 40, 40), crop_pct=p.crop_pct, interpolation=p.interpolation,
                              mean=p.mean, std=p.std, is_training=False)
    ref = timm_t(img)
    assert ours.shape == ref.shape == (3, 40, 40)
    # timm resizes a float-less PIL image and converts after; we resize the uint8 tensor:
    # one grey level of rounding difference at most.
    assert (ours - ref).abs().max().item() <= (1.5 / 255) / min(p.std) + 1e-6
