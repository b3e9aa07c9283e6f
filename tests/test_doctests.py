"""The examples in the torch-free modules' docstrings run in the default suite, so they cannot rot."""

from __future__ import annotations

import doctest
import importlib

import pytest

# Modules whose examples need neither torch nor data on disk (the engine's and the trainer's
# examples that would train or load models are marked ``+SKIP`` in place).
DOCTEST_MODULES = (
    "ensembler.errors",
    "ensembler.filehash",
    "ensembler.names",
    "ensembler.metrics",
    "ensembler.labels",
    "ensembler.logits",
    "ensembler.progress",
    "ensembler.data._common",
    "ensembler.infer.views",
    "ensembler.ensemble.voting",
    "ensembler.ensemble.calibration",
    "ensembler.ensemble.blend",
    "ensembler.ensemble.choice",
    "ensembler.ensemble.members",
    "ensembler.ensemble.recipe",
    "ensembler.ensemble.tuning",
    "ensembler.ensemble.tune_run",
    "ensembler.predict",
    "ensembler.cli",
    "ensembler.data.identical",
)


@pytest.mark.parametrize("name", DOCTEST_MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, report=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples of {name} fail"


def test_the_promised_examples_are_there():
    # vote, tune_weights and the Logits file round trip are the examples a reader copies first.
    found = {name: doctest.DocTestFinder().find(importlib.import_module(name)) for name in DOCTEST_MODULES}
    examples = {t.name.rsplit(".", 1)[-1] for tests in found.values() for t in tests if t.examples}
    assert {"vote", "tune_weights", "load_oof", "tie_rate", "log_softmax", "member_names", "parse_tta"} <= examples
