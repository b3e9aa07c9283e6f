"""Trainer defaults by regime: fine-tuning pretrained weights vs training from scratch.

The numbers behind the from-scratch defaults are in ensembler/train/config.py and
benchmarks/RESULTS.md (bench_quality.py on real face photos); here: that they apply, that an
explicit value always wins, that the eval geometry travels with the checkpoint, and that the run
header says which values came from the regime."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ensembler.data import load_source
from ensembler.registry import Registry
from ensembler.train import TrainConfig, train_folds
from ensembler.train.config import REGIME_DEFAULTS
from ensembler.train.datasets import resolve_augment, train_transform
from ensembler.train.fold_runner import train_preprocess


def test_regime_defaults_fill_only_what_was_not_given():
    scratch = TrainConfig(arch="resnet18", pretrained=False)
    assert scratch.regime == "from-scratch"
    assert (scratch.lr, scratch.warmup_epochs, scratch.crop) == (3e-3, 0.3, "full")
    assert scratch.defaulted == ["crop", "lr", "warmup_epochs"]
    tuned = TrainConfig(arch="resnet18")
    assert tuned.regime == "fine-tune" and (tuned.lr, tuned.crop) == (3e-4, "timm")
    mine = TrainConfig(arch="resnet18", pretrained=False, lr=5e-4, crop="timm")
    assert (mine.lr, mine.crop) == (5e-4, "timm") and mine.defaulted == ["warmup_epochs"]
    # the stored config round-trips with the values it ran with
    again = TrainConfig.from_dict(scratch.to_dict())
    assert again.to_dict() == scratch.to_dict()
    with pytest.raises(Exception, match="^crop must be one of"):
        TrainConfig(arch="resnet18", crop="half")


def test_auto_augment_follows_the_data_and_the_regime():
    assert resolve_augment("auto", "digits", "from-scratch") == "none"  # a mirrored digit is another class
    assert resolve_augment("auto", "digits", "fine-tune") == "light"
    assert resolve_augment("auto", "csv", "from-scratch") == "flip" == REGIME_DEFAULTS["from-scratch"]["augment"]
    assert resolve_augment("auto", "mask", "fine-tune") == "standard"
    assert resolve_augment("standard", "csv", "from-scratch") == "standard"


def test_full_crop_keeps_the_whole_image_and_flip_is_the_eval_geometry_mirrored():
    from PIL import Image

    pre = train_preprocess(TrainConfig(arch="efficientnet_b0", pretrained=False, img_size=64))
    assert (pre.crop_pct, pre.crop_mode, pre.input_size) == (1.0, "squash", (64, 64))
    timm_pre = train_preprocess(TrainConfig(arch="efficientnet_b0", img_size=64))
    assert timm_pre.crop_pct == 0.875 and timm_pre.crop_mode == "center"  # resize to 73, cut 4.5 px a side
    # a bright border along the left 4% of the image: the full view keeps it, the timm crop cuts it
    arr = np.zeros((160, 160, 3), dtype=np.uint8)
    arr[:, :6] = 255
    img = Image.fromarray(arr)
    assert pre.geometry_transform()(img)[:, :, 0].float().mean() > 150
    assert timm_pre.geometry_transform()(img)[:, :, 0].float().mean() < 40
    tf = train_transform(pre, "flip")
    torch.manual_seed(0)
    outs = [tf(img) for _ in range(20)]
    eval_view = pre.geometry_transform()(img)
    assert all(torch.equal(o, eval_view) or torch.equal(o, eval_view.flip(-1)) for o in outs)
    assert any(torch.equal(o, eval_view.flip(-1)) for o in outs) and any(torch.equal(o, eval_view) for o in outs)


def test_checkpoint_carries_the_crop_and_the_header_names_the_regime(tmp_path, capsys, one_torch_thread):
    from rich.console import Console

    table = load_source("digits", cache_dir=tmp_path / "digits")
    table = table.subset(np.arange(len(table)) % 12 == 0)
    cfg = TrainConfig(arch="test_resnet", k=2, epochs=1, img_size=16, pretrained=False, workers=0,
                      batch_size=32, device="cpu")
    con = Console(width=200, record=True)
    result = train_folds(table, cfg, Registry(tmp_path / "reg"), console=con)
    entry = Registry(tmp_path / "reg").family(result.family)[0]
    assert entry.preprocess["crop_pct"] == 1.0 and entry.preprocess["crop_mode"] == "squash"
    assert entry.train_config["lr"] == 3e-3 and entry.train_config["defaulted"] == ["crop", "lr", "warmup_epochs"]
    text = con.export_text()
    assert "from-scratch (no pretrained weights)" in text and "adamw lr 0.003" in text
    assert "augment none" in text  # digits from scratch: never flipped, nothing heavier
    assert "crop, lr, warmup_epochs, augment from the from-scratch defaults" in text
