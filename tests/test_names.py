"""One vocabulary: the CLI's choices are the owners' names, and ``--help`` never imports torch."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ensembler import names
from ensembler.errors import ParameterError

ROOT = Path(__file__).resolve().parent.parent


def test_building_the_cli_parser_imports_neither_torch_nor_timm():
    code = ("import sys; from ensembler.cli import build_parser; build_parser(); "
            "heavy = sorted(m for m in ('torch', 'timm', 'torchvision', 'sklearn', 'scipy') if m in sys.modules); "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"ensembler --help imports {out.stdout.strip()}"


def test_the_owners_validate_the_same_names():
    from ensembler.data import SOURCE_KINDS
    from ensembler.ensemble import METHODS, METRICS, VOTE_RULES
    from ensembler.infer import BACKENDS, MERGE_RULES
    from ensembler.models import HEADS
    from ensembler.train import config, datasets, losses

    assert SOURCE_KINDS is names.SOURCE_KINDS and BACKENDS is names.BACKENDS and HEADS is names.HEADS
    assert VOTE_RULES is names.VOTE_RULES and METHODS is names.TUNING_METHODS and METRICS is names.TUNING_METRICS
    assert tuple(MERGE_RULES) == names.MERGE_RULE_NAMES
    assert config.AUGMENTS is names.AUGMENTS and datasets.AUGMENT_LEVELS is names.AUGMENT_LEVELS
    assert "flip" in names.AUGMENT_LEVELS and names.AUGMENTS[0] == "auto"
    assert losses.LOSS_NAMES is names.LOSS_NAMES and config.CROPS is names.CROPS


def _choices() -> dict[tuple[str, str], tuple]:
    from ensembler.cli import build_parser

    out = {}
    for command, sub in next(a for a in build_parser()._actions
                             if isinstance(a, argparse._SubParsersAction)).choices.items():
        for action in sub._actions:
            if action.choices is not None and action.option_strings:
                out[(command, action.option_strings[0])] = tuple(action.choices)
    return out


def test_cli_choices_are_the_names_module():
    ch = _choices()
    assert ch[("tune-weights", "--method")] == names.TUNING_METHODS
    assert ch[("tune-weights", "--metric")] == names.TUNING_METRICS
    assert ch[("predict", "--vote")] == ch[("evaluate", "--vote")] == names.VOTE_RULES
    assert ch[("train-folds", "--augment")] == names.AUGMENTS
    assert ch[("train-folds", "--loss")] == names.LOSS_NAMES
    assert ch[("train-folds", "--head")] == names.HEADS
    assert ch[("infer", "--backend")] == names.BACKENDS
    # every choice list of every command comes from ensembler.names
    vocab = {v for v in vars(names).values() if isinstance(v, tuple)}
    assert {k: v for k, v in ch.items() if v not in vocab} == {}


def test_one_member_name_rule_for_predict_and_tune_weights(tmp_path):
    from ensembler.ensemble import load_members
    from ensembler.logits import Logits, write_logits
    from ensembler.registry import Registry

    reg = Registry(tmp_path / "reg")
    with pytest.raises(ParameterError, match="members lists 'a' twice") as a:
        reg.member_names("a, b, a")
    y = np.array([0, 1, 0, 1])
    f = write_logits(tmp_path / "a.npz", Logits(["p", "q", "r", "s"], np.eye(2)[y].astype(np.float32), labels=y,
                                                folds=np.array([0, 0, 1, 1])))
    with pytest.raises(ParameterError, match="members lists 'a' twice") as b:
        load_members("a,a", oof_files=[f])
    assert a.value.parameter == b.value.parameter == "members"
    assert [m.name for m in load_members(["a"], oof_files=[f])] == ["a"]
