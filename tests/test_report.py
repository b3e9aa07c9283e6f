"""ensembler report: one self-contained HTML page (fast: its content and that nothing leaves the file;
slow: the demo's report in a real headless Chromium)."""

from __future__ import annotations

import base64
import io
import json
import shutil
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
import torch

from ensembler.cli import main
from ensembler.data import SampleTable
from ensembler.ensemble import Recipe, RecipeMember
from ensembler.labels import LabelSpace
from ensembler.logits import Logits, write_logits
from ensembler.models import create_model
from ensembler.preprocess import Preprocess
from ensembler.registry import Registry
from ensembler.report import ReportError, build_report
from ensembler.train.curves import write_metrics_csv

LABELS = LabelSpace(("cat", "dog", "fox"))
PRE = Preprocess(input_size=(32, 32), crop_pct=1.0, interpolation="bilinear", mean=(0.5, 0.5, 0.5),
                 std=(0.5, 0.5, 0.5))


class _Links(HTMLParser):
    """Every tag and every src/href attribute of a page."""

    def __init__(self):
        super().__init__()
        self.tags, self.links = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.links += [(tag, k, v) for k, v in attrs if k in ("src", "href", "srcset", "poster", "data")]


def _registry(tmp_path, n=60):
    """Two families with OOF logits, metrics.csv, a recipe, a tta-report file and a ledger row."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    reg = Registry(tmp_path / "checkpoints")
    ids = np.array([f"s{i}" for i in range(n)])
    y = rng.integers(0, 3, n)
    folds = np.arange(n) % 3
    for fam, arch, signal in (("res", "test_resnet", 2.0), ("eff", "test_efficientnet", 1.0)):
        for fold in range(3):
            reg.add(create_model(arch, label_space=LABELS), family=fam, fold=fold, arch=arch, head="flat",
                    label_space=LABELS, preprocess=PRE, oof=f"{fam}/oof.npz")
        z = rng.normal(size=(n, 3)) + signal * np.eye(3)[y]
        write_logits(reg.root / fam / "oof.npz", Logits(ids, z, label_space=LABELS, labels=y, folds=folds, name=fam))
        write_metrics_csv(reg.root / fam / "metrics.csv", {f: [
            {"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.1 / e, "val_f1": 0.5 + 0.1 * e, "val_acc": 0.5 + 0.1 * e,
             "lr": 1e-3} for e in (1, 2, 3)] for f in range(3)})
    shas = {f: tuple(e.sha256 for e in reg.family(f)) for f in ("res", "eff")}
    recipe = Recipe(members=(RecipeMember("res", "family", LABELS.classes, 0.8, 1.4, shas["res"]),
                             RecipeMember("eff", "family", LABELS.classes, 0.2, 0.7, shas["eff"])),
                    method="caruana",
                    scores={"honest": {"metric": "f1", "mean": 0.61, "per_fold": {"0": 0.6, "1": 0.62, "2": 0.61},
                                       "pooled": {"f1": 0.61, "acc": 0.62, "logloss": 0.9}}}).save(tmp_path / "r.json")
    scores = [{"name": "no TTA (identity)", "kind": "baseline", "f1": 0.7, "acc": 0.7, "logloss": 0.8,
               "delta_f1": 0.0, "delta_acc": 0.0, "delta_logloss": 0.0},
              {"name": "hflip", "kind": "view", "f1": 0.68, "acc": 0.69, "logloss": 0.82, "delta_f1": -0.02,
               "delta_acc": -0.01, "delta_logloss": 0.02},
              {"name": "merged mean-logits", "kind": "merged", "f1": 0.72, "acc": 0.72, "logloss": 0.75,
               "delta_f1": 0.02, "delta_acc": 0.02, "delta_logloss": -0.05}]
    tta = write_logits(reg.root / "res" / "res_oof_tta_hflip.npz", Logits(
        ids, rng.normal(size=(n, 3)), label_space=LABELS, labels=y, folds=folds, name="res",
        meta={"family": "res", "tta": "hflip", "merge": "mean-logits", "rows": n, "scores": scores, "seconds": 1.2}))
    (tmp_path / "submissions").mkdir()
    (tmp_path / "submissions" / "ledger.jsonl").write_text(json.dumps({
        "time": "2026-12-02T20:00:00+0000", "output": "submissions/tuned.csv", "rows": 9,
        "recipe_hash": Recipe.load(recipe).hash(), "members": [{"name": "res"}, {"name": "eff"}], "vote": "weighted",
        "tta": "hflip", "backend": "torch", "output_sha256": "ab" * 32}) + "\n")
    return reg, recipe, tta


def _held_out(tmp_path, n=6):
    from PIL import Image

    rng = np.random.default_rng(1)
    (tmp_path / "held").mkdir()
    rows = []
    for i in range(n):
        path = tmp_path / "held" / f"h{i}.png"
        Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)).save(path)
        rows.append({"id": f"h{i}", "path": str(path), "label": i % 3, "group": f"h{i}"})
    return SampleTable(pd.DataFrame(rows), LABELS, {"kind": "csv", "path": str(tmp_path / "held")})


def check_self_contained(html: str) -> int:
    """Assert nothing on the page points outside it; returns the number of embedded PNGs."""
    from PIL import Image

    parser = _Links()
    parser.feed(html)
    assert not {"script", "link", "iframe", "object", "embed"} & set(parser.tags)
    pngs = 0
    for tag, attr, value in parser.links:
        if attr == "href":
            assert value.startswith("#"), f"<{tag} href={value[:60]!r}> leaves the file"
        else:
            assert value.startswith("data:image/png;base64,"), f"<{tag} {attr}={value[:60]!r}> leaves the file"
            Image.open(io.BytesIO(base64.b64decode(value.split(",", 1)[1]))).verify()
            pngs += 1
    lowered = html.lower()
    for needle in ("http://", "https://", "url(", "@import", "@font-face", "//fonts."):
        assert needle not in lowered, f"{needle!r} in the page"
    return pngs


def test_report_is_one_self_contained_page_with_every_section(tmp_path, one_torch_thread):
    reg, recipe, tta = _registry(tmp_path)
    res = build_report(reg, recipe=recipe, tta_reports=[tta], data=_held_out(tmp_path), out=tmp_path / "r.html",
                       cache_dir=tmp_path / "cache", progress=False)
    html = res.path.read_text()
    assert check_self_contained(html) == res.figures == 7  # fold, pairs, per-class, confusion, reliability, tta, curves
    assert res.sections == ["Leaderboard", "Members by fold", "Disagreement and error correlation", "Per-class F1",
                            "Confusion matrix", "Reliability", "TTA per view", "Learning curves", "Ledger"]
    assert 'name="viewport"' in html and "max-width:100%" in html  # phone width: images scale, tables scroll
    for text in ("test_resnet", "0.800", "1.400", "recipe (honest, nested CV)", "0.6100 ± 0.0082", "held-out F1",
                 "(this recipe)", "tuned.csv", "res_oof_tta_hflip.npz"):
        assert text in html, text


def test_report_cli_without_recipe_and_bad_tta_file(tmp_path, capsys):
    reg, _, tta = _registry(tmp_path)
    out = tmp_path / "plain.html"
    assert main(["report", "--registry", str(reg.root), "--out", str(out)]) == 0
    html = out.read_text()
    check_self_contained(html)
    assert "soft vote (in-sample)" in html and "No tta-report files given" in html
    assert "wrote" in capsys.readouterr().out
    assert main(["report", "--registry", str(reg.root), "--out", str(out)]) == 2  # the one --out rule
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main(["report", "--registry", str(reg.root), "--out", str(out), "--overwrite"]) == 0
    with pytest.raises(ReportError, match="oof.npz is not an OOF-TTA file"):
        build_report(reg, tta_reports=[reg.root / "res" / "oof.npz"], out=tmp_path / "x.html", progress=False)
    assert not (tmp_path / "x.html").exists()


# ------------------------------------------------------------------------------------------- browser
def open_in_chromium(html_path, screenshot, width=390, height=844):
    """Load a page in headless Chromium: console errors, page errors, requests, images' naturalWidth,
    and whether the page is wider than the viewport. Skips when no browser can be driven."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium; .ci/run installs it when missing)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")
    seen = {"errors": [], "requests": []}
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.on("console", lambda m: seen["errors"].append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: seen["errors"].append(str(e)))
            page.on("request", lambda r: seen["requests"].append(r.url))
            page.goto(html_path.resolve().as_uri(), wait_until="load")
            seen["images"] = page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth])")
            seen["overflow"] = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return seen


@pytest.mark.slow
def test_demo_report_renders_in_headless_chromium(tmp_path):
    from ensembler.demo import run_demo
    from ensembler.infer import tta_report

    demo = run_demo(tmp_path / "demo", quick=True, progress=False)
    reg = Registry(demo.out_dir / "checkpoints")
    from ensembler.data import load_source

    train = load_source(demo.out_dir / "splits" / "train.csv")
    rep = tta_report(train, "resnet", reg, tta="scales=0.875,1,1.125", progress=False)
    test = load_source(demo.out_dir / "splits" / "test.csv")
    res = build_report(reg, recipe=demo.out_dir / "recipe.json", tta_reports=[rep.output], data=test,
                       tta="scales=0.875,1,1.125", out=tmp_path / "report.html", progress=False)
    assert check_self_contained(res.path.read_text()) == res.figures
    shot = tmp_path / "report_phone.png"
    seen = open_in_chromium(res.path, shot)
    assert seen["errors"] == []
    assert {u for u in seen["requests"] if not u.startswith("data:")} == {res.path.resolve().as_uri()}
    assert len(seen["images"]) == res.figures and all(ok and w > 0 for ok, w in seen["images"])
    assert seen["overflow"] <= 1, "the page is wider than a phone's screen (only tables may scroll sideways)"
    assert shot.stat().st_size > 10_000
