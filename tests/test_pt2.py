"""torch.export + AOTInductor .pt2 packages: load, same numbers as eager at N = 0, 64, 1000; joint gradient.

An AOTInductor package takes 30-70 s to build on the 2-core CI CPU, so packages are built for one
configuration per family with its own kernel path (``conftest.PT2_CONFIGS``): FocalLoss (focal), the IoU losses
(giou) and the GFL losses (dfl, as a joint loss + gradient package). They live in the session cache, so the
runtime matrix reuses them. Every loss is traced by torch.export (dynamic N, min 0) in the ONNX column of the
matrix (``torch.onnx.export(dynamo=True)`` goes through torch.export).
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import PT2_CONFIGS

from visdet_export.check import runner_options
from visdet_export.export.joint import eager_joint
from visdet_export.export.verify import TOLERANCES, verify

SIZES = (0, 64, 1000)


def _package(runner_cache, name):
    key, options = runner_options(name, "pt2")
    return runner_cache.runner(name, "pt2", key=key, **options)


@pytest.mark.parametrize("name", PT2_CONFIGS)
def test_package_matches_eager(runner_cache, name):
    loss, spec = runner_cache.loss(name)
    package = _package(runner_cache, name)
    assert package.path.suffix == ".pt2"
    for index, n in enumerate(SIZES):
        inputs = spec.sample(loss, n, seed=index, include=list(package.names))
        with torch.no_grad():
            want = spec.call(loss, inputs)
        got = package(inputs)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, **TOLERANCES["pt2"])


def test_joint_package_gradient_matches_autograd(runner_cache):
    loss, spec = runner_cache.loss("dfl")
    package = _package(runner_cache, "dfl")
    manifest = json.loads(package.path.with_name(package.path.name + ".json").read_text())
    assert manifest["joint"] and manifest["outputs"] == ["loss", "grad_pred"]
    for index, n in enumerate(SIZES):
        inputs = spec.sample(loss, n, seed=10 + index, include=list(package.names))
        value, grad = package.run_all(inputs)
        want_value, want_grad = eager_joint(loss, spec, inputs)
        torch.testing.assert_close(value, want_value, **TOLERANCES["pt2"])
        torch.testing.assert_close(grad, want_grad, **TOLERANCES["pt2"])


def test_manifest_and_verify(runner_cache):
    package = _package(runner_cache, "giou")
    manifest = json.loads(package.path.with_name(package.path.name + ".json").read_text())
    assert manifest["format"] == "pt2" and manifest["dynamic_dims"] == {"N": {"min": 0}}
    assert [entry["name"] for entry in manifest["inputs"]] == ["pred", "target", "weight", "avg_factor"]
    report = verify(package.path, sizes=SIZES, seed=3)
    assert report["passed"] and report["sizes"] == list(SIZES)
