"""torch.export and AOTInductor ``.pt2`` packages: every representative configuration, N = 0, 64, 1000.

* torch.export: every configuration exports with a dynamic N (min 0) and the exported program runs at N = 0, 1,
  7 and 1000 with eager's numbers (cheap: no compilation).
* AOTInductor: one AOTInductor package costs 20-70 s of compilation on the 2-core CI CPU, so every configuration
  goes into ONE joint bundle (``export_pt2_bundle``: loss and gradient w.r.t. ``pred`` of every configuration,
  each with its own dynamic N), built once per session in ``runner_cache`` and shared with the runtime matrix
  (test_matrix's pt2 column). Each configuration is checked in values and gradients at N = 0, 64 and 1000
  (mask cross-entropy capped: its per-sample input is 80 x 28 x 28).
* The single-loss exporter ``export_pt2`` (manifest, ``verify``) is checked on one joint package (dfl), and
  ``export_pt2_bundle``'s own parity check and manifest on a two-loss detector recipe (GFL).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import CONFIG_NAMES

from visdet_export import build_loss
from visdet_export.check import runner_options
from visdet_export.export.artifacts import ArtifactError
from visdet_export.export.joint import eager_joint, select_inputs
from visdet_export.export.pt2 import (
    EXPORT_PARITY_SIZES,
    bundle_entries,
    export_program,
    export_pt2_bundle,
    load_runner,
    verify_bundle,
)
from visdet_export.export.verify import TOLERANCES, verify
from visdet_export.runtimes import default_names
from visdet_export.specs import SampleOptions, spec_for

SIZES = (0, 64, 1000)
TOL = TOLERANCES["pt2"]


def _bundle(runner_cache):
    return runner_cache.pt2_bundle(CONFIG_NAMES[0])


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_export_program_dynamic_n(runner_cache, name):
    loss, spec = runner_cache.loss(name)
    names = default_names(loss, spec)
    program = export_program(loss, spec, names)
    module = program.module()
    for index, n in enumerate((0, 1, 7, 1000)):
        n = spec.capped(n)
        inputs = spec.sample(loss, n, seed=index, include=names)
        with torch.no_grad():
            want = spec.call(loss, inputs)
            got = module(*[inputs[key] for key in names])
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_bundle_entry_matches_eager_values_and_gradients(runner_cache, name):
    loss, spec = runner_cache.loss(name)
    key, options = runner_options(name, "pt2")
    package = runner_cache.runner(name, "pt2", key=key, **options)
    assert package.joint and package.path.suffix == ".pt2"
    for index, n in enumerate(spec.capped_sizes(SIZES)):
        inputs = spec.sample(loss, n, seed=20 + index, include=list(package.names))
        value, grad = package.run_all(inputs)
        want_value, want_grad = eager_joint(loss, spec, inputs)
        assert value.shape == want_value.shape and grad.shape == want_grad.shape
        torch.testing.assert_close(value, want_value, **TOL)
        torch.testing.assert_close(grad, want_grad, **TOL)


@pytest.mark.parametrize(("name", "n"), [("giou", 2_000_000), ("l1", 1_000_000), ("ce_softmax", 100_000)])
def test_totals_over_many_samples_keep_float32_precision(runner_cache, name, n):
    """AOTInductor summed a float32 total of a dynamic size in float32 lanes: GIoU's mean over 2M boxes was 2.3e-4
    off, growing with N; now within eager's own float32 error of the float64 loss."""
    loss, spec = runner_cache.loss(name)
    key, options = runner_options(name, "pt2")
    package = runner_cache.runner(name, "pt2", key=key, **options)
    inputs = spec.sample(loss, n, seed=7, include=list(package.names))
    value, _ = package.run_all(inputs)
    wide = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    with torch.no_grad():
        want = spec.call(loss, wide)
    torch.testing.assert_close(value.double(), want, rtol=1e-6, atol=0)


def test_bundle_manifest_and_independent_sizes(runner_cache):
    bundle = _bundle(runner_cache)
    manifest = json.loads(bundle.path.with_name(bundle.path.name + ".json").read_text())
    assert manifest["bundle"] and manifest["format"] == "pt2"
    assert [entry["name"] for entry in manifest["entries"]] == list(CONFIG_NAMES)
    assert all(entry["joint"] for entry in manifest["entries"])
    assert manifest["dynamic_dims"] == {
        f"{symbol}_{name}": {"min": {"N": 0, "B": 2}.get(symbol, 1)}  # DFL needs two bins
        for name in CONFIG_NAMES
        for symbol in runner_cache.loss(name)[1].symbols()
    }
    focal = next(entry for entry in manifest["entries"] if entry["name"] == "focal")
    assert [item["name"] for item in focal["inputs"]] == ["pred", "target", "weight", "avg_factor"]
    assert "focal/pred" in bundle.input_names and "focal/grad_pred" in bundle.output_names
    assert next(i for i in manifest["inputs"] if i["name"] == "focal/pred")["shape"] == ["N_focal", "C_focal"]

    # One call, every entry at its own N (a detector's loss_cls over all anchors, loss_bbox over positives) and, every
    # other entry, its own class / bin / mask sizes.
    feed, expected = {}, {}
    for index, name in enumerate(CONFIG_NAMES):
        loss, spec = runner_cache.loss(name)
        entry = next(e for e in manifest["entries"] if e["name"] == name)
        names = [item["name"] for item in entry["inputs"]]
        options = SampleOptions(sizes=spec.smaller_sizes() if index % 2 else {})
        inputs = spec.sample(loss, spec.capped(3 * index), seed=index, options=options, include=names)
        feed.update({f"{name}/{key}": inputs[key] for key in names})
        value, grad = eager_joint(loss, spec, inputs)
        expected.update({f"{name}/loss": value, f"{name}/grad_pred": grad})
    outputs = dict(zip(bundle.output_names, bundle(feed)))
    assert set(outputs) == set(expected)
    for key, want in expected.items():
        torch.testing.assert_close(outputs[key], want, **TOL, msg=lambda m, key=key: f"{key}: {m}")


def test_bundle_entry_runner_and_verify(runner_cache):
    bundle = _bundle(runner_cache)
    dfl = load_runner(bundle.path, entry="dfl")  # the other entries' empty inputs take their least sizes (2 bins)
    loss, spec = runner_cache.loss("dfl")
    inputs = spec.sample(loss, 4, seed=2, include=dfl.input_names)
    torch.testing.assert_close(dfl(inputs)[0], eager_joint(loss, spec, inputs)[0], **TOL)
    with pytest.raises(ArtifactError, match=r"input 'dfl/pred' has B_dfl = 1; the package takes B_dfl >= 2"):
        dfl({**inputs, "pred": inputs["pred"][:, :1]})
    run = load_runner(bundle.path, entry="giou")
    assert run.input_names == ["pred", "target", "weight", "avg_factor"] and run.output_names == ["loss", "grad_pred"]
    loss, spec = runner_cache.loss("giou")
    inputs = spec.sample(loss, 5, seed=1, include=run.input_names)
    value, grad = run(inputs)
    want_value, want_grad = eager_joint(loss, spec, inputs)
    torch.testing.assert_close(value, want_value, **TOL)
    torch.testing.assert_close(grad, want_grad, **TOL)
    with pytest.raises(ArtifactError, match="no entry"):
        load_runner(bundle.path, entry="nope")
    report = verify_bundle(bundle.path, sizes=(0, 1, 7), seed=5)
    assert report["passed"] and set(report["entries"]) == set(CONFIG_NAMES)
    generic = verify(bundle.path, sizes=(0, 3), seed=6)  # what `visdet-export verify` calls
    assert generic["passed"] and generic["bundle"] and set(generic["entries"]) == set(CONFIG_NAMES)


def test_single_joint_package_manifest_and_verify(runner_cache):
    key, options = runner_options("dfl", "pt2", pt2="separate")
    package = runner_cache.runner("dfl", "pt2", key=key, **options)
    manifest = json.loads(package.path.with_name(package.path.name + ".json").read_text())
    assert manifest["format"] == "pt2" and manifest["dynamic_dims"] == {"N": {"min": 0}, "B": {"min": 2}}
    assert manifest["joint"] and manifest["outputs"] == ["loss", "grad_pred"]
    assert manifest["output_shapes"] == {"loss": [], "grad_pred": ["N", "B"]}
    assert [entry["name"] for entry in manifest["inputs"]] == ["pred", "target", "weight", "avg_factor"]
    report = verify(package.path, sizes=SIZES, seed=3)
    assert report["passed"] and report["sizes"] == list(SIZES)
    with pytest.raises(ArtifactError, match="not a bundle"):
        load_runner(package.path, entry="dfl")


def test_recipe_bundle_export_verifies_and_records_parity(tmp_path):
    """The user's path: a detector recipe's losses (GFL: loss_cls, loss_bbox) in one package, verified on export,
    only the classification loss joint."""
    path = tmp_path / "gfl.pt2"
    losses = {
        "loss_cls": {"type": "QualityFocalLoss", "use_sigmoid": True, "beta": 2.0, "loss_weight": 1.0},
        "loss_bbox": {"type": "GIoULoss", "loss_weight": 2.0},
    }
    written = export_pt2_bundle(losses, path, joint=["loss_cls"])
    assert written == path and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    manifest = json.loads(path.with_name(path.name + ".json").read_text())
    assert manifest["outputs"] == ["loss_cls/loss", "loss_cls/grad_pred", "loss_bbox/loss"]
    assert [entry["output_shapes"] for entry in manifest["entries"]] == [
        {"loss": [], "grad_pred": ["N", "C"]}, {"loss": []}  # in the entry's symbols (N_loss_cls: entry["dims"])
    ]
    assert [i["name"] for i in manifest["inputs"][:3]] == ["loss_cls/pred", "loss_cls/labels", "loss_cls/scores"]
    for entry in manifest["entries"]:
        assert entry["parity"]["sizes"] == list(EXPORT_PARITY_SIZES)
        assert entry["parity"]["max_abs_err"] <= entry["parity"]["atol"] + 1e-3
    with pytest.raises(ArtifactError, match="exists"):
        export_pt2_bundle(losses, path)


@pytest.mark.parametrize(
    ("losses", "joint", "match"),
    [
        ({}, False, "at least one"),
        ({"a/b": {"type": "L1Loss"}}, False, "contain no"),
        ({"l1": {"type": "L1Loss"}}, ["giou"], "not entries"),
        ({"x-y": {"type": "L1Loss"}, "x_y": {"type": "MSELoss"}}, False, "collide"),
    ],
)
def test_bundle_entries_rejects_bad_requests(losses, joint, match):
    with pytest.raises(ValueError, match=match):
        bundle_entries(losses, joint=joint)


FREE_SIZE_LAYOUTS = [
    (dict(type="FocalLoss"), "labels"), (dict(type="FocalLoss"), "onehot"),
    (dict(type="QualityFocalLoss"), "pair"), (dict(type="QualityFocalLoss"), "dense"),
    (dict(type="DistributionFocalLoss"), None), (dict(type="CrossEntropyLoss"), None),
    (dict(type="CrossEntropyLoss", use_sigmoid=True), "labels"),
    (dict(type="CrossEntropyLoss", use_sigmoid=True), "dense"),
    (dict(type="CrossEntropyLoss", use_sigmoid=True, reduction="sum"), "dense"),
    (dict(type="CrossEntropyLoss", use_mask=True), None), (dict(type="KnowledgeDistillationKLDivLoss"), None),
]


@pytest.mark.parametrize("joint", [False, True], ids=["loss", "joint"])
@pytest.mark.parametrize(("cfg", "variant"), FREE_SIZE_LAYOUTS, ids=lambda v: str(v) if isinstance(v, str) else None)
def test_every_layout_with_free_sizes_exports_without_a_guard_on_them(cfg, variant, joint):
    """torch.export with every free size dynamic: a guard on one (a check that C != 1 in the reduction, say) fails
    the export ("Constraints violated (C)"), as it did for sigmoid CE's dense layout."""
    loss = build_loss(cfg)
    spec = spec_for(loss, variant)
    summed = cfg.get("reduction") == "sum"  # visdet refuses avg_factor there
    names = select_inputs(spec, [t.name for t in spec.inputs if t.optional and not (t.name == "avg_factor" and summed)])
    program = export_program(loss, spec, names, joint=joint)
    assert program.graph_module is not None and spec.sizes


def test_a_loaded_package_checks_its_inputs(runner_cache):
    """AOTInductor reads whatever memory it is given: the runner refuses what the package was not compiled for."""
    key, options = runner_options("dfl", "pt2", pt2="separate")
    run = load_runner(runner_cache.runner("dfl", "pt2", key=key, **options).path)
    loss, spec = runner_cache.loss("dfl")
    inputs = spec.sample(loss, 6, seed=0, include=run.input_names)
    assert run(inputs)[0].isfinite().all()
    mistakes = [
        ({"pred": inputs["pred"].double()}, "input 'pred' is float64; the package takes float32"),
        ({"weight": inputs["weight"][:5]}, "input 'weight' has N = 5 but 'pred' has N = 6"),
        ({"target": inputs["target"][:, None]}, r"input 'target' has shape \(6, 1\); it takes \['N'\]"),
        # below the compiled range (an index error inside the package, or a silent 0 in a bundle's entry)
        ({"pred": inputs["pred"][:, :1]}, "input 'pred' has B = 1; the package takes B >= 2"),
    ]
    for change, message in mistakes:
        with pytest.raises(ArtifactError, match=message):
            run({**inputs, **change})


def test_the_compiled_input_checks_accept_every_size_the_manifest_allows(runner_cache, monkeypatch):
    """AOTI_RUNTIME_CHECK_INPUTS=1 turns on the checks compiled into a package, from the ranges inductor kept:
    they must not hold the example's sizes (AOTInductor guarded N >= 2 and N, B <= 4096 from them)."""
    key, options = runner_options("dfl", "pt2", pt2="separate")
    path = runner_cache.runner("dfl", "pt2", key=key, **options).path
    loss, spec = runner_cache.loss("dfl")
    names = load_runner(path).input_names
    monkeypatch.setenv("AOTI_RUNTIME_CHECK_INPUTS", "1")  # read when the package loads
    package = torch._inductor.aoti_load_package(str(path))
    for n, sizes in ((0, {}), (1, {}), (5000, {}), (3, {"B": 2}), (2, {"B": 5000})):
        inputs = spec.sample(loss, n, seed=n, options=SampleOptions(sizes={**spec.sizes, **sizes}), include=names)
        loss_value, grad = package(*(inputs[name] for name in names))
        assert loss_value.isfinite() and grad.shape == inputs["pred"].shape, (n, sizes)
    with pytest.raises(RuntimeError, match="unmatched dtype"):  # the checks are on
        package(*(inputs[name].double() if name == "pred" else inputs[name] for name in names))


def test_a_package_held_at_exit_leaves_no_extracted_copy(runner_cache, tmp_path):
    """A training script that compiled its step and keeps a runner in a global: the loader's extracted copy of the
    package (``$TMPDIR/aotinductor_*``) is gone when the process ends (the loader, held by the globals Dynamo keeps
    alive, was never destroyed before)."""
    key, options = runner_options("dfl", "pt2", pt2="separate")
    path = runner_cache.runner("dfl", "pt2", key=key, **options).path
    script = (
        "import os, sys, torch\n"
        "from visdet_export.export.pt2 import load_runner\n"
        "RUNNER = load_runner(sys.argv[1])\n"
        "step = torch.compile(lambda x: x + 1, backend='eager')\n"
        "step(torch.ones(3))\n"
        "print(sorted(os.listdir(os.environ['TMPDIR'])))\n"
    )
    temp = tmp_path / "tmp"
    temp.mkdir()
    done = subprocess.run([sys.executable, "-c", script, str(path)], env={**os.environ, "TMPDIR": str(temp)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "aotinductor_" in done.stdout  # extracted where the test looks
    assert not [entry.name for entry in temp.iterdir() if entry.name.startswith("aotinductor_")]
