"""The examples in the docstrings of small pure functions run and hold."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "fairage.fairness.conformal",
    "fairage.data.schema",
    "fairage.fairness.metrics",
    "fairage.outputs.reference",
    "fairage.outputs.report",
    "fairage.workflows.suite",
    "fairage.training.run",
    "fairage.fairness.weighting",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no docstring examples"
    assert result.failed == 0
