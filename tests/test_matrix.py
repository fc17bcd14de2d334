"""The runtime matrix: every registered loss x {eager, compile, script, onnx, pt2} x N in {0, 1, 7, 1000}.

Rows come from the registry-driven representative configurations (every name in ``MODELS.module_dict`` has at
least one). Runners come from the session cache, so nothing is compiled or exported twice: the compile column
uses inductor for ``conftest.INDUCTOR_CONFIGS`` and aot_eager elsewhere; the pt2 column runs each
configuration's entry of one joint AOTInductor bundle of every configuration (see test_pt2 for why). Values are
compared for every runtime, and gradients with respect to ``pred`` for the differentiable ones (compile, script)
and the joint pt2 entries, at ``visdet_export.check.TOLERANCES``.
"""

from __future__ import annotations

import pytest
from conftest import CONFIG_NAMES, compile_backend

from visdet_export.check import check_cell, run_matrix, runner_options
from visdet_export.registry import MODELS
from visdet_export.specs import representative_configs

RUNTIMES = ("eager", "compile", "script", "onnx", "pt2")
CELLS = [(name, runtime) for name in CONFIG_NAMES for runtime in RUNTIMES]


def test_every_registered_loss_has_a_row():
    covered = {cfg["type"] for cfg in representative_configs().values()}
    assert set(MODELS.module_dict) <= covered, sorted(set(MODELS.module_dict) - covered)


@pytest.mark.parametrize(("name", "runtime"), CELLS, ids=[f"{n}-{r}" for n, r in CELLS])
def test_cell(runner_cache, name, runtime):
    key, options = runner_options(name, runtime, backend=compile_backend(name))
    cell = check_cell(name, runtime, runner_cache, runner_key=key, runner_options=options)
    assert cell.status == "pass", cell.reason


def test_pt2_modes():
    (cell,) = run_matrix(["l1"], ["pt2"], pt2="subset")
    assert cell.status == "skip" and "subset" in cell.reason
    with pytest.raises(ValueError, match="pt2 mode"):
        run_matrix(["l1"], ["pt2"], pt2="everything")
    assert runner_options("l1", "pt2") == ("pt2:bundle", {"bundle": True})
    assert runner_options("dfl", "pt2", pt2="separate") == ("pt2:joint", {"joint": True})
