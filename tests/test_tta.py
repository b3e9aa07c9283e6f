"""TTA plans, view construction and merges: parity with ttach, properties, refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ensembler.errors import EnsemblerError
from ensembler.infer import TTAError, merge_views, parse_tta, predict_batch
from ensembler.infer.tta import View, apply_view, forward_chunked, is_oom_error, predict_views


@pytest.fixture(scope="module")
def model():
    import timm

    torch.manual_seed(0)
    return timm.create_model("test_resnet", pretrained=False, num_classes=7).eval()


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 3, 64, 64, generator=g)


def _ttach(name):
    import ttach as tta

    return {
        "hflip": (tta.aliases.hflip_transform(), "hflip"),
        "vflip": (tta.aliases.vlip_transform(), "vflip"),
        "flip": (tta.aliases.flip_transform(), "flip"),
        "d4": (tta.aliases.d4_transform(), "d4"),
        "five-crop": (tta.aliases.five_crop_transform(48, 40), "five-crop=48x40"),
        "ten-crop": (tta.aliases.ten_crop_transform(47, 47), "ten-crop=47"),
        "hflip+five-crop": (tta.Compose([tta.HorizontalFlip(), tta.FiveCrops(40, 40)]), "hflip+five-crop=40"),
        "scales": (tta.Compose([tta.Scale([0.75, 1, 1.25], interpolation="bilinear")]), "scales=0.75,1,1.25"),
    }[name]


@pytest.mark.parametrize("name", ["hflip", "vflip", "flip", "d4", "five-crop", "ten-crop", "hflip+five-crop", "scales"])
def test_predict_batch_matches_ttach_mean(model, images, name):
    import ttach as tta

    transforms, spec = _ttach(name)
    with torch.no_grad():
        expected = tta.ClassificationTTAWrapper(model, transforms, merge_mode="mean")(images)
    merged, views = predict_batch(model, images, tta=spec, merge="mean-logits", return_views=True)
    assert merged.shape == expected.shape
    torch.testing.assert_close(merged, expected, atol=1e-4, rtol=0)
    # The per-view order is ttach's too: view v equals ttach's v-th transformer output.
    assert views.shape[1] == len(transforms)
    for v, transformer in enumerate(transforms):
        with torch.no_grad():
            ref = model(transformer.augment_image(images))
        torch.testing.assert_close(views[:, v], ref, atol=1e-4, rtol=0)


def test_one_forward_for_all_views(model, images):
    calls = []
    handle = model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        predict_batch(model, images, tta="d4")
    finally:
        handle.remove()
    assert calls == [images.shape[0] * 8]


def test_chunking_gives_the_same_logits(model, images):
    whole = predict_batch(model, images, tta="flip")
    chunked = predict_batch(model, images, tta="flip", chunk_size=5)
    torch.testing.assert_close(whole, chunked, atol=1e-5, rtol=0)


@pytest.mark.parametrize("exc", [torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"),
                                 RuntimeError("CUDA error: out of memory")])
def test_chunk_halves_on_out_of_memory(exc):
    seen = []

    def forward(x):
        seen.append(x.shape[0])
        if x.shape[0] > 3:
            raise exc
        return x.flatten(1)[:, :2] * 2

    x = torch.arange(16 * 2, dtype=torch.float32).view(16, 2, 1, 1)
    out, chunk = forward_chunked(forward, x)
    assert chunk == 2 and seen[:4] == [16, 8, 4, 2]
    torch.testing.assert_close(out, x.flatten(1) * 2)


def test_non_oom_errors_are_not_retried():
    def forward(x):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    assert not is_oom_error(RuntimeError("shape mismatch"))
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        forward_chunked(forward, torch.zeros(4, 3))


def test_plan_parsing_canonical_and_product_order():
    assert parse_tta(None).spec == "none" and len(parse_tta("none")) == 1
    assert parse_tta(" HFlip + five-crop=32 ").spec == "hflip+five-crop=32x32"
    plan = parse_tta("hflip+five-crop=32")
    assert len(plan) == 10
    # left token outermost, left op applied first (ttach Compose order)
    assert plan.views[0].ops == (("crop", "lt", 32, 32),)
    assert plan.views[5].ops == (("hflip",), ("crop", "lt", 32, 32))
    assert [v.ops for v in parse_tta("ten-crop=32").views] == [v.ops for v in plan.views]
    assert len(parse_tta("flip+scales=0.9,1.0,1.1")) == 12
    assert parse_tta("none+hflip").spec == "hflip"


@pytest.mark.parametrize(
    "spec, match",
    [
        ("hflipp", r"unknown TTA token 'hflipp'.*valid tokens: none, hflip"),
        ("flip+rot", r"unknown TTA token 'rot'"),
        ("five-crop", r"five-crop needs a size"),
        ("five-crop=0", r"five-crop needs a size"),
        ("scales=a,b", r"scales needs positive factors"),
        ("hflip=2", r"hflip takes no '=' argument"),
        ("hflip++flip", r"empty token"),
        ("hflip+hflip", r"'hflip' given more than once"),
    ],
)
def test_bad_plans_name_the_token(spec, match):
    with pytest.raises(TTAError, match=match):
        parse_tta(spec)
    assert issubclass(TTAError, EnsemblerError)


def test_d4_refuses_non_square_inputs(model):
    with pytest.raises(TTAError, match=r"d4 .*square inputs, got 48x64"):
        predict_batch(model, torch.randn(1, 3, 48, 64), tta="d4")


def test_crop_larger_than_input_is_refused(model):
    with pytest.raises(TTAError, match=r"crop 80x80 is larger than the 64x64 input"):
        predict_batch(model, torch.randn(1, 3, 64, 64), tta="five-crop=80")


@pytest.mark.parametrize("merge, match", [("gmean", "NaN"), ("gmean-logits", "NaN"), ("tsharpen", "NaN"),
                                          ("max", "max-probs"), ("median", "valid rules: mean-logits")])
def test_refused_merges_explain_why(model, images, merge, match):
    with pytest.raises(TTAError, match=match):
        predict_batch(model, images, tta="flip", merge=merge)


def test_merge_rules_in_their_declared_space():
    g = torch.Generator().manual_seed(3)
    views = torch.randn(4, 5, 6, generator=g) * 3
    p = views.softmax(-1)
    torch.testing.assert_close(merge_views(views, "mean-logits"), views.mean(1))
    torch.testing.assert_close(merge_views(views, "mean-probs").exp(), p.mean(1))
    torch.testing.assert_close(merge_views(views, "gmean-probs").exp(), p.prod(1) ** (1 / 5))
    torch.testing.assert_close(merge_views(views, "max-probs").exp(), p.amax(1))
    # outputs are logit-like: softmax renormalises, never NaN, even with negative logits
    for rule in ("mean-probs", "gmean-probs", "max-probs"):
        out = merge_views(views - 50, rule)
        assert torch.isfinite(out).all()
        assert math.isclose(out.softmax(-1).sum(-1)[0].item(), 1.0, rel_tol=1e-5)


# --------------------------------------------------------------------------- properties
_sizes = st.tuples(st.integers(2, 9), st.integers(2, 9))


@settings(max_examples=25, deadline=None)
@given(size=_sizes, seed=st.integers(0, 2**16))
def test_flips_and_rotations_are_invertible(size, seed):
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(seed))
    for op in (("hflip",), ("vflip",)):
        twice = apply_view(apply_view(x, View((op,))), View((op,)))
        assert torch.equal(twice, x)
        assert not torch.equal(apply_view(x, View((op,))), x) or _is_symmetric(x, op)
    four = x
    for _ in range(4):
        four = apply_view(four, View((("rot90", 1),)))
    assert torch.equal(four, x)
    # rot90^k then rot90^(4-k) is the identity as well
    for k in range(1, 4):
        back = apply_view(apply_view(x, View((("rot90", k),))), View((("rot90", 4 - k),)))
        assert torch.equal(back, x)


def _is_symmetric(x, op):
    dim = 3 if op[0] == "hflip" else 2
    return torch.equal(x.flip(dim), x)


@settings(max_examples=25, deadline=None)
@given(size=_sizes, data=st.data())
def test_crops_equal_slicing(size, data):
    h, w = size
    ch = data.draw(st.integers(1, h))
    cw = data.draw(st.integers(1, w))
    x = torch.arange(2 * 3 * h * w, dtype=torch.float32).view(2, 3, h, w)
    views = parse_tta(f"five-crop={ch}x{cw}").views
    expected = [x[:, :, :ch, :cw], x[:, :, h - ch:, :cw], x[:, :, h - ch:, w - cw:], x[:, :, :ch, w - cw:]]
    top, left = h // 2 - ch // 2, w // 2 - cw // 2
    expected.append(x[:, :, top:top + ch, left:left + cw])
    for view, exp in zip(views, expected):
        out = apply_view(x, view)
        assert out.shape[-2:] == (ch, cw) == view.output_size((h, w))
        assert torch.equal(out, exp)


def test_fixed_size_models_get_views_resized_back():
    seen = []

    def forward(x):
        seen.append(tuple(x.shape[-2:]))
        return x.mean(dim=(2, 3))

    x = torch.rand(2, 3, 32, 32)
    views = predict_views(forward, x, "five-crop=24+scales=1,1.5", resize_to=(32, 32))
    assert views.shape == (2, 10, 3)
    assert set(seen) == {(32, 32)}
    # without resize_to the crops keep their own size (ttach semantics)
    seen.clear()
    predict_views(forward, x, "five-crop=24")
    assert set(seen) == {(24, 24)}


def test_views_built_on_input_device_and_dtype_kept(model):
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    out = apply_view(x, parse_tta("hflip+center-crop=16").views[1])
    assert out.dtype == torch.float64 and out.device == x.device
    assert np.array_equal(out.numpy(), x.flip(3)[:, :, 8:24, 8:24].numpy())
