"""Model construction, heads, joint log-probs and safe reading of outside checkpoints."""

from __future__ import annotations

import argparse
import pickle

import numpy as np
import pytest
import torch

from ensembler import EnsemblerError, LabelSpace, RegistryError
from ensembler.models import (
    create_model,
    head_num_outputs,
    joint_log_probs,
    joint_logits,
    load_outside_state_dict,
    read_outside_checkpoint,
)

from conftest import RunsCode, tiny_model

ABC = LabelSpace(("a", "b", "c"))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------- heads
def test_head_num_outputs():
    mask = LabelSpace.mask()
    assert head_num_outputs(mask, "flat") == 18
    assert head_num_outputs(mask, "factored") == 3 + 2 + 3
    assert head_num_outputs(mask.to_dict(), "factored") == 8
    with pytest.raises(EnsemblerError, match="factored head needs a factored LabelSpace"):
        head_num_outputs(ABC, "factored")
    with pytest.raises(EnsemblerError, match="head must be one of"):
        head_num_outputs(ABC, "tree")


@pytest.mark.parametrize("arch", ["test_resnet", "test_efficientnet"])
def test_create_model_heads(arch):
    mask = LabelSpace.mask()
    x = torch.randn(2, 3, 32, 32)
    flat = create_model(arch, label_space=mask, head="flat").eval()
    factored = create_model(arch, label_space=mask, head="factored").eval()
    with torch.no_grad():
        assert flat(x).shape == (2, 18)
        assert factored(x).shape == (2, 8)
    with pytest.raises(EnsemblerError, match="num_classes is set by label_space"):
        create_model(arch, label_space=mask, num_classes=5)


def test_factored_joint_log_probs_are_product_of_factor_probs():
    mask = LabelSpace.mask()
    torch.manual_seed(0)
    model = create_model("test_resnet", label_space=mask, head="factored").eval()
    with torch.no_grad():
        out = model(torch.randn(4, 3, 32, 32)) * 5  # sharpen so the ranking is not all ties
    joint = joint_log_probs(out, "factored", mask)
    assert joint.shape == (4, 18)
    probs = joint.exp()
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(4), rtol=0, atol=1e-6)
    pm, pg, pa = out[:, :3].softmax(-1), out[:, 3:5].softmax(-1), out[:, 5:].softmax(-1)
    product = torch.einsum("nm,ng,na->nmga", pm, pg, pa).reshape(4, 18)
    torch.testing.assert_close(probs, product, rtol=1e-5, atol=1e-7)
    assert torch.equal(probs.argsort(dim=1, descending=True), product.argsort(dim=1, descending=True))
    # class = mask*6 + gender*3 + age: the top class is the product of each factor's top choice
    top = mask.joint_index((int(pm[0].argmax()), int(pg[0].argmax()), int(pa[0].argmax())))
    assert int(probs[0].argmax()) == top
    # joint_logits of a factored head are these same log-probs
    torch.testing.assert_close(joint_logits(out, "factored", mask), joint)
    # numpy works too
    np.testing.assert_allclose(joint_log_probs(out.numpy(), "factored", mask), joint.numpy(), atol=1e-5)


def test_flat_joint_logits_unchanged_and_log_probs_normalised():
    logits = torch.randn(3, 18)
    assert joint_logits(logits, "flat", LabelSpace.mask()) is logits
    lp = joint_log_probs(logits, "flat", LabelSpace.mask())
    torch.testing.assert_close(lp, logits.log_softmax(-1))
    with pytest.raises(EnsemblerError, match=r"factored head over 18 classes has 8 outputs.*\(3, 18\)"):
        joint_logits(logits, "factored", LabelSpace.mask())


def test_unknown_arch_lists_close_matches():
    with pytest.raises(EnsemblerError, match=r"unknown timm architecture 'resnet5O'.*resnet50"):
        create_model("resnet5O", label_space=ABC)
    with pytest.raises(EnsemblerError, match="unknown timm architecture"):
        create_model("definitely_not_a_model_xyz", label_space=ABC)


def test_pretrained_download_failure_explains_the_way_out(monkeypatch):
    # Offline mode makes huggingface_hub fail at once, as it does (after retries) with no network.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(EnsemblerError, match=r"could not be downloaded.*--no-pretrained.*--pretrained-path"):
        create_model("test_resnet", label_space=ABC, pretrained=True)


def test_pretrained_path_loads_backbone_and_reinitialises_other_head(tmp_path):
    source = tiny_model(num_classes=10, seed=1)
    path = tmp_path / "backbone.pth"
    torch.save({"state_dict": source.state_dict()}, path)
    model = create_model("test_resnet", label_space=ABC, pretrained_path=path)
    got, want = model.state_dict(), source.state_dict()
    assert got["fc.weight"].shape == (3, want["fc.weight"].shape[1])
    backbone = [k for k in want if not k.startswith("fc.")]
    assert backbone and all(torch.equal(got[k], want[k]) for k in backbone)
    # with the same class count the classifier is kept too
    same = create_model("test_resnet", label_space=LabelSpace(tuple("abcdefghij")), pretrained_path=path)
    assert _same(same.state_dict(), want)


# ---------------------------------------------------------------------------- outside files
@pytest.mark.parametrize("style", ["bare", "state_dict", "model", "module.", "_orig_mod.", "model.",
                                   "module._orig_mod."])
def test_outside_wrapper_styles(tmp_path, style):
    sd = tiny_model().state_dict()
    if style in ("bare",):
        obj = sd
    elif style in ("state_dict", "model"):
        obj = {style: sd, "epoch": 3, "args": argparse.Namespace(lr=0.1)}  # timm train-script style
    else:
        obj = {"state_dict": {style + k: v for k, v in sd.items()}}  # DDP / compile / Lightning
    path = tmp_path / "ckpt.pth.tar"
    torch.save(obj, path)
    assert _same(load_outside_state_dict(path), sd)


def test_outside_ema_choice_is_explicit(tmp_path):
    plain, ema = tiny_model(seed=0).state_dict(), tiny_model(seed=1).state_dict()
    path = tmp_path / "both.pth"
    torch.save({"state_dict": plain, "state_dict_ema": ema}, path)
    with pytest.raises(RegistryError, match=r"both.pth holds both EMA.*--ema or --no-ema"):
        load_outside_state_dict(path)
    assert _same(load_outside_state_dict(path, use_ema=True), ema)
    assert _same(load_outside_state_dict(path, use_ema=False), plain)
    only_ema = tmp_path / "ema.pth"
    torch.save({"model_ema": ema}, only_ema)
    got = read_outside_checkpoint(only_ema)
    assert got.ema and got.key == "model_ema" and _same(got.state_dict, ema)
    with pytest.raises(RegistryError, match="--no-ema was asked for.*only EMA"):
        load_outside_state_dict(only_ema, use_ema=False)
    only_plain = tmp_path / "plain.pth"
    torch.save({"model": plain}, only_plain)
    with pytest.raises(RegistryError, match="--ema was asked for.*no EMA"):
        load_outside_state_dict(only_plain, use_ema=True)


def test_outside_safetensors_and_bin(tmp_path):
    from safetensors.torch import save_file

    sd = tiny_model().state_dict()
    save_file({"_orig_mod." + k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "m.safetensors"))
    assert _same(load_outside_state_dict(tmp_path / "m.safetensors"), sd)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    assert _same(load_outside_state_dict(tmp_path / "pytorch_model.bin"), sd)


def test_pickle_that_runs_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": tiny_model().state_dict(), "payload": RunsCode(marker)}, path)
    assert not marker.exists()
    with pytest.raises(RegistryError, match=r"refused to load .*evil.pth.*arbitrary code"):
        load_outside_state_dict(path)
    assert not marker.exists()
    # the same with an old-style (non-zip) pickle
    legacy = tmp_path / "evil_legacy.pt"
    torch.save(RunsCode(marker), legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(RegistryError, match="refused to load"):
        load_outside_state_dict(legacy)
    assert not marker.exists()


def test_outside_bad_files(tmp_path):
    sd = tiny_model().state_dict()
    with pytest.raises(RegistryError, match="unknown checkpoint suffix '.npz'"):
        load_outside_state_dict(tmp_path / "x.npz")
    with pytest.raises(RegistryError, match="not found"):
        load_outside_state_dict(tmp_path / "missing.pth")
    (tmp_path / "trunc.pth").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(RegistryError, match="cannot read checkpoint .*trunc.pth"):
        load_outside_state_dict(tmp_path / "trunc.pth")
    bad = dict(sd)
    bad["fc.bias"] = bad["fc.bias"].clone()
    bad["fc.bias"][0] = float("nan")
    torch.save(bad, tmp_path / "nan.pth")
    with pytest.raises(RegistryError, match=r"nan.pth holds non-finite .* fc.bias"):
        load_outside_state_dict(tmp_path / "nan.pth")
    torch.save({"optimizer": {"lr": 0.1}}, tmp_path / "opt.pth")
    with pytest.raises(RegistryError, match="opt.pth holds no state dict"):
        load_outside_state_dict(tmp_path / "opt.pth")
    with open(tmp_path / "plain.pkl.pth", "wb") as fh:
        pickle.dump({"a": 1}, fh, protocol=2)
    with pytest.raises(RegistryError, match="plain.pkl.pth"):
        load_outside_state_dict(tmp_path / "plain.pkl.pth")
