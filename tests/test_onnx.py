"""ONNX export + onnxruntime: every representative configuration, the exporter traps, joint loss + gradient graphs.

Exports are the expensive part (a few seconds each), so each distinct export happens once per module, through
the ``exports`` fixture, and every test reuses it. onnxruntime must match eager within rtol 1e-4, atol 1e-5
(RELIABILITY 30) with the same output shape.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from conftest import onnx_model
from onnx import numpy_helper
from reference import boxes
from torch import Tensor, nn

from visdet_export import build_loss
from visdet_export.export import ArtifactError, eager_joint, export_onnx, read_manifest
from visdet_export.export import onnx as onnx_export
from visdet_export.export.joint import DEFAULT_OPTIONAL_INPUTS
from visdet_export.registry import loss_config
from visdet_export.specs import CONFIG_VARIANTS, LossSpec, SampleOptions, representative_configs, spec_for

CONFIGS = representative_configs()
RTOL, ATOL = 1e-4, 1e-5
SMALL_SIZES = (0, 1, 7)
LARGE_N = 100_000
# Mask logits hold 80 x 28 x 28 values per sample; their "large" N keeps pred near LARGE_N x 80 elements.
LARGE_ELEMENTS = LARGE_N * 84
# Configurations whose pred holds logits that a sigmoid / softmax saturates (and the activated ones, whose pred
# holds probabilities that the extreme logits drive to exactly 0 and 1).
EXTREME_KEYS = [
    key
    for key in (
        "focal", "qfl", "qfl_gfl", "ce_sigmoid_centerness", "ce_sigmoid_labels", "ce_mask", "ce_softmax",
        "ce_class_weight", "ce_softmax_probabilities", "dfl", "focal_activated", "qfl_activated", "kd_kl_div", "ld",
    )
    if key in CONFIGS
]
JOINT_KEYS = ["focal", "qfl", "dfl", "giou", "ce_softmax", "l1", "ce_class_weight", "ce_softmax_probabilities"]
NONE_KEYS = ["focal", "dfl", "giou"]
NO_OPTIONAL_KEYS = ["focal", "ce_softmax", "giou", "ce_mask"]
BOX_KEYS = [key for key in ("iou_log", "iou_linear", "iou_square", "giou") if key in CONFIGS]


@dataclass
class Exported:
    path: Path
    manifest: dict[str, Any]
    loss: nn.Module
    spec: LossSpec
    names: list[str]
    model: onnx.ModelProto
    runner: Any

    def draw(self, n: int, *, seed: int = 0, options: SampleOptions = SampleOptions()) -> dict[str, Tensor]:
        drawn = self.spec.sample(self.loss, n, seed=seed, options=options, include=self.names)
        return {name: drawn[name] for name in self.names}

    def run(self, inputs: Mapping[str, Tensor]) -> list[Tensor]:
        return self.runner(inputs)

    def eager(self, inputs: Mapping[str, Tensor]) -> Tensor:
        with torch.no_grad():
            return self.spec.call(self.loss, inputs)


class Exports:
    """Each distinct export once per module, in one temporary directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cache: dict[tuple[Any, ...], Exported] = {}

    def get(
        self,
        key: str,
        *,
        reduction: Optional[str] = None,
        optional: tuple[str, ...] = DEFAULT_OPTIONAL_INPUTS,
        joint: bool = False,
    ) -> Exported:
        cache_key = (key, reduction, optional, joint)
        if cache_key not in self.cache:
            cfg = dict(CONFIGS[key])
            if reduction is not None:
                cfg["reduction"] = reduction
            loss = build_loss(cfg)
            variant = CONFIG_VARIANTS.get(key)
            spec = spec_for(loss, variant)
            parts = [key, reduction or "default", "+".join(optional) or "required", "joint" if joint else "loss"]
            stem = "-".join(parts)
            # Joint graphs are exported from the module, the rest from the config mapping: both entry points.
            path = export_onnx(
                loss if joint else cfg,
                self.root / f"{stem}.onnx",
                variant=variant,
                optional_inputs=optional,
                joint=joint,
            )
            manifest = read_manifest(path)
            names = [entry["name"] for entry in manifest["inputs"]]
            model = onnx.load(str(path))
            runner = onnx_export.load_runner(path, manifest)
            self.cache[cache_key] = Exported(path, manifest, loss, spec, names, model, runner)
        return self.cache[cache_key]


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> Exports:
    return Exports(tmp_path_factory.mktemp("onnx"))


def assert_matches(actual: Tensor, expected: Tensor) -> None:
    assert tuple(actual.shape) == tuple(expected.shape)
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL)


def all_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    nodes = list(model.graph.node)
    for function in model.functions:
        nodes.extend(function.node)
    return nodes


def large_n(spec: LossSpec) -> int:
    return min(LARGE_N, max(64, LARGE_ELEMENTS // spec.per_sample_elements()))


def saturate(inputs: dict[str, Tensor], logit: float) -> dict[str, Tensor]:
    """Every pred entry at +logit or -logit (probabilities 0 / 1 for the activated losses)."""
    pred = inputs["pred"]
    if pred.numel() and float(pred.min()) >= 0.0 and float(pred.max()) <= 1.0:  # probabilities
        return {**inputs, "pred": (pred > 0.5).to(pred.dtype)}
    return {**inputs, "pred": torch.where(pred >= 0, logit, -logit).to(pred.dtype)}


# --- the matrix: every representative configuration ------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "symbol", "size"),
    [
        ("ce_sigmoid_labels", "C", 1),  # RPN: (N, 1) objectness logits, label 1 = background
        ("ce_softmax", "C", 81),  # Faster R-CNN's RoI head: C + 1 columns
        ("focal", "C", 20),  # a VOC head
        ("qfl", "C", 3),
        ("kd_kl_div", "C", 2),
        ("dfl", "B", 8),  # reg_max 7
        ("ce_mask", "H", 14),
        ("mse", "D", 2),  # YOLOv3's wh
    ],
)
def test_one_export_serves_every_size_the_config_leaves_free(
    exports: Exports, key: str, symbol: str, size: int
) -> None:
    art = exports.get(key)
    for n in (0, 7, 300):
        inputs = art.draw(n, seed=n, options=SampleOptions(sizes={symbol: size}))
        axis = art.spec.inputs[0].shape.index(symbol)
        assert inputs[art.spec.pred].shape[axis] == size
        (got,) = art.run(inputs)
        torch.testing.assert_close(got, art.eager(inputs), rtol=RTOL, atol=ATOL)


def test_dense_sigmoid_cross_entropy_exports_with_its_gradient(tmp_path: Path) -> None:
    """YOLOv3 / YOLOX class targets: (N, C) logits and soft targets; the export verifies value and d loss / d pred
    at its default sizes and at C = 20 (``parity.free_sizes``)."""
    path = export_onnx(
        dict(type="CrossEntropyLoss", use_sigmoid=True), tmp_path / "dense.onnx", variant="dense", joint=True
    )
    manifest = read_manifest(path)
    assert manifest["variant"] == "dense" and [item["shape"] for item in manifest["inputs"][:2]] == [["N", "C"]] * 2
    assert manifest["parity"]["free_sizes"] == {"C": 20}


@pytest.mark.parametrize("key", list(CONFIGS))
def test_export_is_valid_and_described(exports: Exports, key: str) -> None:
    art = exports.get(key)
    onnx.checker.check_model(art.model, full_check=True)
    # every initializer is read: onnxruntime warns at each session about those that are not
    read = {name for node in art.model.graph.node for name in node.input} | {o.name for o in art.model.graph.output}
    assert [init.name for init in art.model.graph.initializer if init.name not in read] == []
    assert [i.name for i in art.model.graph.input] == art.spec.names  # all inputs, spec order, spec names
    assert [o.name for o in art.model.graph.output] == ["loss"]
    assert art.model.opset_import[0].version >= 18
    # Hyper-parameters are constants of the graph and recorded in its metadata.
    props = {p.key: p.value for p in art.model.metadata_props}
    assert json.loads(props["visdet_export.config"]) == json.loads(json.dumps(loss_config(art.loss)))
    assert props["visdet_export.loss_type"] == art.spec.loss_type
    # The manifest, read back (its checksum checked).
    m = art.manifest
    assert m["format"] == "onnx" and m["opset"] == 18 and m["dtype"] == "float32" and m["joint"] is False
    assert m["loss_type"] == art.spec.loss_type and m["variant"] == art.spec.variant
    assert m["config"] == json.loads(props["visdet_export.config"])
    assert [entry["name"] for entry in m["inputs"]] == art.spec.names and m["outputs"] == ["loss"]
    assert m["inputs"][0]["shape"][0] == "N"
    assert not any(entry["optional"] for entry in m["inputs"])  # the graph needs every input it lists
    # Free sizes (classes, bins, mask sizes) stay symbolic in the graph; sizes the configuration fixes do not.
    assert [entry["shape"] for entry in m["inputs"]] == [list(t.shape) for t in art.spec.inputs if t.name in art.names]
    # no samples is valid input, no classes (DFL: fewer than two bins) is not
    least = {"N": 0, "B": 2}
    assert m["dynamic_dims"] == {s: {"min": least.get(s, 1)} for s in art.spec.symbols(art.names)}
    graph_inputs = {value.name: value for value in art.model.graph.input}
    for entry in m["inputs"]:
        dims = graph_inputs[entry["name"]].type.tensor_type.shape.dim
        assert [isinstance(d, str) for d in entry["shape"]] == [d.HasField("dim_param") for d in dims], entry
        assert graph_inputs[entry["name"]].doc_string == entry["doc"] != ""  # the .onnx alone says it too
    assert art.model.graph.output[0].doc_string.startswith("the loss")
    parity = m["parity"]
    assert parity["sizes"][:3] == [0, 1, 7] and parity["rtol"] == RTOL and parity["atol"] == ATOL
    assert 0.0 <= parity["max_abs_err"] and 0.0 <= parity["max_rel_err"]
    assert build_loss(m["config"]).extra_repr() == art.loss.extra_repr()


@pytest.mark.parametrize("key", list(CONFIGS))
def test_graph_avoids_the_exporter_traps(exports: Exports, key: str) -> None:
    nodes = all_nodes(exports.get(key).model)
    ops = {node.op_type for node in nodes}
    # onnxruntime's SoftmaxCrossEntropyLoss fails at N = 0 (and drops a following sum).
    assert "SoftmaxCrossEntropyLoss" not in ops and "NegativeLogLikelihoodLoss" not in ops
    # Log(Sigmoid(x)) is -inf in onnxruntime once x <= -18, and Log(Sigmoid(|x|)) keeps no relative precision for
    # the small terms of confident logits: no Log reads a Sigmoid (export.onnx.compensated_log1p).
    producer = {output: node for node in nodes for output in node.output}
    for node in nodes:
        if node.op_type == "Log" and node.input[0] in producer:
            assert producer[node.input[0]].op_type != "Sigmoid"
    # ONNX fills a missing bound of Clip with the float's extremes: clamp(min=0) of +inf was 3.4e38
    # (export.onnx.one_sided_clips)
    for node in nodes:
        if node.op_type == "Clip":
            assert len(node.input) == 3 and node.input[1] and node.input[2], node.name


@pytest.mark.parametrize("key", list(CONFIGS))
def test_reductions_name_nonnegative_axes(exports: Exports, key: str) -> None:
    """onnxruntime before 1.32 leaves a reduction over a negative axis of an empty tensor unreduced (N = 0 failed
    there); this onnxruntime does not, so the graph itself is checked."""
    model = exports.get(key, joint=key in JOINT_KEYS).model
    constants = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    constants.update(
        (node.output[0], numpy_helper.to_array(node.attribute[0].t))
        for node in model.graph.node
        if node.op_type == "Constant"
    )
    reductions = [node for node in model.graph.node if node.op_type.startswith("Reduce") and len(node.input) > 1]
    for node in reductions:
        assert (constants[node.input[1]] >= 0).all(), node.name


@pytest.mark.parametrize(
    ("key", "joint"), [(key, False) for key in CONFIGS] + [(key, True) for key in JOINT_KEYS],
    ids=[*CONFIGS, *(f"{key}-joint" for key in JOINT_KEYS)],
)
def test_onnxruntime_refuses_inputs_whose_shapes_disagree(exports: Exports, key: str, joint: bool) -> None:
    """onnxruntime only warns about shapes that differ from the declared ones: without the graph's own checks a
    target of fewer rows, a (2,) avg_factor, regression targets of one column were a number, no error."""
    import onnxruntime as ort

    art = exports.get(key, joint=joint)
    session = ort.InferenceSession(str(art.path), providers=["CPUExecutionProvider"])
    feeds = {name: value.numpy() for name, value in art.draw(5, seed=3).items()}
    expected = session.run(None, feeds)
    shapes = {t.name: t.shape for t in art.spec.inputs}
    mismatches = 0
    for name in art.names:
        for axis, symbol in enumerate(shapes[name]):
            first = next(other for other in art.names if symbol in shapes[other])
            if not isinstance(symbol, str) or first == name:
                continue
            shrunk = {**feeds, name: np.take(feeds[name], range(feeds[name].shape[axis] - 1), axis=axis)}
            with pytest.raises(Exception, match=rf"input check: {name}.shape\[{axis}\] must equal {first}"):
                session.run(None, shrunk)
            mismatches += 1
    assert mismatches, "every loss graph takes two inputs of N rows"
    if "avg_factor" in feeds:
        one_element = session.run(None, {**feeds, "avg_factor": feeds["avg_factor"].reshape(1)})
        for got, want in zip(one_element, expected):
            np.testing.assert_array_equal(got, want)
        with pytest.raises(Exception, match="input check: avg_factor must be 0-d"):
            session.run(None, {**feeds, "avg_factor": np.repeat(feeds["avg_factor"].reshape(1), 2)})


@pytest.mark.parametrize(
    ("key", "joint"), [(key, False) for key in CONFIGS] + [(key, True) for key in JOINT_KEYS],
    ids=[*CONFIGS, *(f"{key}-joint" for key in JOINT_KEYS)],
)
def test_checked_inputs_keep_their_declared_shapes(exports: Exports, key: str, joint: bool) -> None:
    """The loss reads each input through the checks' reshape, whose computed shape hides the input's from shape
    inference; the graph declares it again, so that onnxruntime's rewrites that need static sizes still apply."""
    model = exports.get(key, joint=joint).model
    declared = {value.name: value.type for value in model.graph.value_info}
    readers = {name for node in model.graph.node for name in node.input}
    checked = [value for value in model.graph.input if f"{value.name}__visdet_checked" in readers]
    assert checked, "every loss graph takes two inputs of N rows, so it checks them"
    for value in checked:
        assert declared[f"{value.name}__visdet_checked"] == value.type


@pytest.mark.parametrize("key", BOX_KEYS)
def test_onnxruntime_splits_the_box_columns_in_one_pass(exports: Exports, key: str, tmp_path: Path) -> None:
    """Each box input's four column Slices become one Split when onnxruntime knows the input is (N, 4): through the
    checks' reshape without a declared shape they stayed eight strided copies (IoU forward at 1M boxes, 1 thread:
    50 against 28 ms)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(exports.get(key).path), options, providers=["CPUExecutionProvider"])
    ops = [node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node]
    assert (ops.count("Split"), ops.count("Slice")) == (2, 0)


@pytest.mark.parametrize("n", SMALL_SIZES)
@pytest.mark.parametrize("key", list(CONFIGS))
def test_onnxruntime_matches_eager(exports: Exports, key: str, n: int) -> None:
    art = exports.get(key)
    inputs = art.draw(n, seed=100 + n)
    (out,) = art.run(inputs)
    expected = art.eager(inputs)
    assert_matches(out, expected)
    if n == 0:
        assert float(out) == 0.0  # the mean of nothing is 0, not NaN


@pytest.mark.slow
@pytest.mark.parametrize("key", list(CONFIGS))
def test_onnxruntime_matches_eager_large(exports: Exports, key: str) -> None:
    art = exports.get(key)
    inputs = art.draw(large_n(art.spec), seed=5)
    (out,) = art.run(inputs)
    assert_matches(out, art.eager(inputs))


# --- reductions and optional inputs ----------------------------------------------------------------------------


@pytest.mark.parametrize("key", NONE_KEYS)
def test_reduction_none_keeps_the_elementwise_shape(exports: Exports, key: str) -> None:
    art = exports.get(key, reduction="none")
    for n in (0, 1, 7, 300):
        inputs = art.draw(n, seed=n)
        (out,) = art.run(inputs)
        expected = art.eager(inputs)
        assert expected.dim() >= 1 and expected.shape[0] == n
        assert_matches(out, expected)


@pytest.mark.parametrize("key", NO_OPTIONAL_KEYS)
def test_without_optional_inputs_the_count_is_not_frozen(exports: Exports, key: str) -> None:
    """Exported at N = 7 without avg_factor, the mean divides by the count of the inputs it is given."""
    art = exports.get(key, optional=())
    assert [i.name for i in art.model.graph.input] == [t.name for t in art.spec.inputs if not t.optional]
    for n in (0, 1, 3, 7, 300):
        inputs = art.draw(n, seed=n)
        (out,) = art.run(inputs)
        assert_matches(out, art.eager(inputs))
        if n == 0:
            assert float(out) == 0.0


def test_weight_only_and_sum_reduction_keep_the_sum(exports: Exports) -> None:
    """F.cross_entropy(...).sum() exported with its sum replaced by Identity; ours keeps a 0-d sum.

    For reduction="sum" the default avg_factor input (which "sum" rejects) is left out of the graph.
    """
    art = exports.get("ce_softmax", reduction="sum")
    assert art.names == ["pred", "target", "weight"]
    assert "ReduceSum" in {node.op_type for node in all_nodes(art.model)}
    for n in (0, 1, 7, 300):
        inputs = art.draw(n, seed=n)
        (out,) = art.run(inputs)
        assert out.shape == ()
        assert_matches(out, art.eager(inputs))


# --- extreme logits --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["uniform200", "pm120", "pm20"])
@pytest.mark.parametrize("key", EXTREME_KEYS)
def test_extreme_logits_stay_finite_and_match(exports: Exports, key: str, mode: str) -> None:
    art = exports.get(key)
    inputs = art.draw(64, seed=3, options=SampleOptions(logit_range=200.0))
    if mode != "uniform200":
        inputs = saturate(inputs, 120.0 if mode == "pm120" else 20.0)
    (out,) = art.run(inputs)
    expected = art.eager(inputs)
    assert torch.isfinite(expected).all()
    assert torch.isfinite(out).all(), f"onnxruntime gave {out} for {mode} logits"
    assert_matches(out, expected)


@pytest.mark.parametrize("joint", [False, True], ids=["loss", "joint"])
@pytest.mark.parametrize("key", BOX_KEYS)
def test_infinite_box_coordinates_are_not_clamped_to_finite(exports: Exports, key: str, joint: bool) -> None:
    """A box with an infinite coordinate (a diverged regression head) and a nonzero weight: the exported loss is
    finite exactly where eager's is (RELIABILITY 26). onnxruntime's one-sided ``Clip`` turned the infinite width
    into 3.4e38, and the GIoU of such a box came out finite where every torch runtime gives NaN."""
    art = exports.get(key, joint=joint)
    inputs = art.draw(6, seed=8)
    if "weight" in inputs:
        inputs["weight"] = inputs["weight"].clamp(min=0.5)
    for column, value in ((0, float("-inf")), (2, float("inf")), (1, -3e38), (3, 3e38)):
        pred = inputs["pred"].clone()
        pred[2, column] = value
        poisoned = {**inputs, "pred": pred}
        value_got = art.run(poisoned)[0]
        value_expected = eager_joint(art.loss, art.spec, poisoned)[0] if joint else art.eager(poisoned)
        assert torch.equal(value_got.isfinite(), value_expected.isfinite()), (column, value, value_got)
        finite = value_expected.isfinite()
        assert_matches(value_got[finite], value_expected[finite])
        if key == "giou":
            assert not value_expected.isfinite().all()  # the case the test is about: inf / inf in the GIoU


def test_one_sided_clips_keep_infinities() -> None:
    """Clip(x, lo) -> Max(x, lo) and Clip(x, '', hi) -> Min(x, hi): torch's clamp, infinities and NaN included;
    a two-sided Clip (whose bounds torch's clamp also applies to infinities) is kept."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    bounds = [helper.make_tensor(name, TensorProto.FLOAT, [], [value]) for name, value in (("lo", 0.0), ("hi", 1.0))]
    clips = {"at_least": ["x", "lo"], "at_most": ["x", "", "hi"], "between": ["x", "lo", "hi"]}
    graph = helper.make_graph(
        [helper.make_node("Clip", inputs, [name], name=name) for name, inputs in clips.items()],
        "clips",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N"])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N"]) for name in clips],
        bounds,
    )
    model = onnx_model(graph)
    assert onnx_export.one_sided_clips(model) == 2
    onnx.checker.check_model(model, full_check=True)
    assert [node.op_type for node in model.graph.node] == ["Max", "Min", "Clip"]
    x = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.5, 0.25, 2.0])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = [torch.from_numpy(out) for out in session.run(None, {"x": x.numpy()})]
    for out, expected in zip(got, (x.clamp(min=0.0), x.clamp(max=1.0), x.clamp(0.0, 1.0))):
        torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)


# --- joint loss + gradient graphs ------------------------------------------------------------------------------


@pytest.mark.parametrize("key", JOINT_KEYS)
def test_joint_graph_matches_eager_autograd(exports: Exports, key: str) -> None:
    art = exports.get(key, joint=True)
    assert [o.name for o in art.model.graph.output] == ["loss", "grad_pred"]
    assert art.manifest["joint"] is True and art.manifest["outputs"] == ["loss", "grad_pred"]
    for n in (0, 1, 7, 1000):
        inputs = art.draw(n, seed=20 + n)
        value, grad = art.run(inputs)
        expected_value, expected_grad = eager_joint(art.loss, art.spec, inputs)
        assert_matches(value, expected_value)
        assert_matches(grad, expected_grad)
        assert grad.shape == inputs["pred"].shape


@pytest.mark.parametrize("mode", ["uniform200", "pm120"])
@pytest.mark.parametrize("key", ["focal", "qfl", "ce_softmax"])
def test_joint_graph_extreme_logits(exports: Exports, key: str, mode: str) -> None:
    art = exports.get(key, joint=True)
    inputs = art.draw(64, seed=4, options=SampleOptions(logit_range=200.0))
    if mode == "pm120":
        inputs = saturate(inputs, 120.0)
    value, grad = art.run(inputs)
    expected_value, expected_grad = eager_joint(art.loss, art.spec, inputs)
    assert torch.isfinite(grad).all() and torch.isfinite(value).all()
    assert_matches(value, expected_value)
    assert_matches(grad, expected_grad)


def test_joint_graph_giou_gradient_of_distant_boxes(tmp_path: Path) -> None:
    """The joint graph differentiates the autograd formulation: GIoU's enclosing term written iou - 1 + U / E keeps
    the gradient of boxes 1e5 apart (~1e-10) within 1e-6 relative of float64 math (0.7% off as iou - (E - U) / E)."""
    loss = build_loss(dict(type="GIoULoss", reduction="sum"))
    pred, target = boxes(200, 0, 10.0, torch.float32), boxes(200, 1, 10.0, torch.float32) + 1e5
    path = export_onnx(loss, tmp_path / "giou.onnx", optional_inputs=(), joint=True)
    _, grad = onnx_export.load_runner(path, read_manifest(path))({"pred": pred, "target": target})
    reference = pred.double().requires_grad_()
    (exact,) = torch.autograd.grad(loss(reference, target.double()), reference)
    torch.testing.assert_close(grad.double(), exact, rtol=1e-6, atol=0)


def test_soft_target_bce_of_confident_logits_in_onnxruntime(tmp_path: Path) -> None:
    """Sigmoid CE on soft targets just below 1 and confident logits, element by element: within 1e-6 of float64
    math (relu(x) - x t, exported before, was 2.4e-4 off at t = 0.9999)."""
    loss = build_loss(dict(type="CrossEntropyLoss", use_sigmoid=True, reduction="none"))
    path = export_onnx(loss, tmp_path / "bce.onnx", variant="dense", optional_inputs=())
    logits = torch.tensor([1000.0, 500.0, 100.0, 20.0, 3.0, -3.0, -20.0, -100.0, -1000.0]).repeat(3, 1)
    soft = torch.tensor([[0.9999], [0.999], [0.99]])
    target = torch.where(logits > 0, soft, 1.0 - soft)
    (value,) = onnx_export.load_runner(path, read_manifest(path))({"pred": logits, "target": target})
    x, t = logits.double(), target.double()
    torch.testing.assert_close(value.double(), (1 - t) * F.softplus(x) + t * F.softplus(-x), rtol=1e-6, atol=0)


@pytest.mark.parametrize("variant", ["dense", "pair"])
def test_joint_graph_qfl_of_confident_predictions(tmp_path: Path, variant: str) -> None:
    """QFL of confident correct predictions (logits 8-20 at score 1): t - sigmoid(x) written t (1 - s) - (1 - t) s
    keeps the loss (~e^-3x) and its gradient within 1e-5 relative of float64 math (t - s: 0 or 100% off)."""
    loss = build_loss(dict(type="QualityFocalLoss", reduction="none"))
    logits = torch.tensor([8.0, 10.0, 12.0, 14.0, 16.0, 20.0])
    pred = torch.stack([logits, -logits], dim=1)
    labels, scores = torch.zeros(6, dtype=torch.long), torch.ones(6)
    target = torch.stack([scores, torch.zeros(6)], dim=1)
    feed = {"labels": labels, "scores": scores} if variant == "pair" else {"target": target}
    path = export_onnx(loss, tmp_path / "qfl.onnx", variant=variant, optional_inputs=(), joint=True)
    value, grad = onnx_export.load_runner(path, read_manifest(path))({"pred": pred, **feed})
    reference = pred.double().requires_grad_()
    exact = loss(reference, (labels, scores.double()) if variant == "pair" else target.double())
    (exact_grad,) = torch.autograd.grad(exact.sum(), reference)
    torch.testing.assert_close(value.double(), exact.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(grad.double(), exact_grad, rtol=1e-5, atol=0)


# --- files: overwrite, failures, noise -------------------------------------------------------------------------


def _listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_existing_files_are_kept_unless_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "l1.onnx"
    path.write_bytes(b"old")
    with pytest.raises(ArtifactError, match="exists"):
        export_onnx(dict(type="L1Loss"), path)
    assert path.read_bytes() == b"old" and _listing(tmp_path) == ["l1.onnx"]
    # A stale manifest alone is not overwritten either.
    stale = tmp_path / "other.onnx.json"
    stale.write_text("{}")
    with pytest.raises(ArtifactError, match="exists"):
        export_onnx(dict(type="L1Loss"), tmp_path / "other.onnx")
    assert _listing(tmp_path) == ["l1.onnx", "other.onnx.json"]

    # With overwrite=True: replaced, described, and neither warnings nor logger levels leak out of the export.
    levels = {name: logging.getLogger(name).level for name in ("torch.onnx", "torch.export", "onnxscript")}
    filters = list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_onnx(dict(type="L1Loss"), path, overwrite=True, verify=False)
    assert [str(w.message) for w in caught] == []
    assert {name: logging.getLogger(name).level for name in levels} == levels
    assert list(warnings.filters) == filters
    onnx.checker.check_model(str(path), full_check=True)
    manifest = read_manifest(path)
    assert manifest["parity"] is None and manifest["config"]["type"] == "L1Loss"
    assert _listing(tmp_path) == ["l1.onnx", "l1.onnx.json", "other.onnx.json"]


def test_refused_paths_and_arguments(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="directory"):
        export_onnx(dict(type="L1Loss"), tmp_path)
    link = tmp_path / "link.onnx"
    link.symlink_to(tmp_path / "elsewhere.onnx")
    with pytest.raises(ArtifactError, match="symlink"):
        export_onnx(dict(type="L1Loss"), link, overwrite=True)
    with pytest.raises(ValueError, match="opset"):
        export_onnx(dict(type="L1Loss"), tmp_path / "a.onnx", opset=17)
    with pytest.raises(ArtifactError, match="opset 99 is not supported by torch's ONNX exporter"):
        export_onnx(dict(type="L1Loss"), tmp_path / "a.onnx", opset=99)  # it writes its default, 18
    with pytest.raises(ValueError, match="optional input"):
        export_onnx(dict(type="L1Loss"), tmp_path / "a.onnx", optional_inputs=("weights",))
    with pytest.raises(ValueError, match="variant"):
        export_onnx(dict(type="FocalLoss"), tmp_path / "a.onnx", variant="dense")
    assert _listing(tmp_path) == ["link.onnx"]


def test_failed_export_leaves_old_file_and_no_temporaries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model that fails its parity check is never put in place; the old file and manifest stay."""
    path = tmp_path / "focal.onnx"
    path.write_bytes(b"old model")
    (tmp_path / "focal.onnx.json").write_text("old manifest")
    real_runner = onnx_export.load_runner

    def wrong_runner(model_path: Path, manifest: Optional[Mapping[str, Any]] = None) -> Any:
        run = real_runner(model_path, manifest)
        return lambda inputs: [out + 1.0 for out in run(inputs)]

    monkeypatch.setattr(onnx_export, "load_runner", wrong_runner)
    with pytest.raises(ArtifactError, match="differs from eager"):
        export_onnx(dict(type="FocalLoss"), path, overwrite=True, optional_inputs=())
    assert path.read_bytes() == b"old model"
    assert (tmp_path / "focal.onnx.json").read_text() == "old manifest"
    assert _listing(tmp_path) == ["focal.onnx", "focal.onnx.json"]
    assert not any(name.endswith(".tmp") for name in os.listdir(tmp_path))


# --- graph rewrites --------------------------------------------------------------------------------------------


SIGN_SELECT_KEYS = ["focal", "qfl", "ce_sigmoid_centerness"]


def sign_selects(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """``Where`` nodes whose condition is ``x >= 0``: a scalar, branching loop in onnxruntime."""
    producer = {output: node for node in model.graph.node for output in node.output}
    return [
        node
        for node in model.graph.node
        if node.op_type == "Where" and getattr(producer.get(node.input[0]), "op_type", None) == "GreaterOrEqual"
    ]


def graphs_of(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and the subgraphs of its nodes (the ``If`` branches of ``unmasked_while_finite``)."""
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            for subgraph in [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else attribute.graphs:
                yield from graphs_of(subgraph)


@pytest.mark.parametrize("key", SIGN_SELECT_KEYS)
def test_sigmoid_sign_selects_are_branch_free(exports: Exports, key: str) -> None:
    model = exports.get(key).model
    assert sign_selects(model) == []
    assert "Abs" in {node.op_type for node in model.graph.node}


@pytest.mark.parametrize("key", SIGN_SELECT_KEYS)
def test_joint_graphs_keep_only_lone_sign_selects(exports: Exports, key: str) -> None:
    """The backward's select pairs are products; what is left selects a value no other select passes on (the
    gradient of clamp(x, 0), say)."""
    model = exports.get(key, joint=True).model
    left = [node for graph in graphs_of(model.graph) for node in sign_selects(onnx.helper.make_model(graph))]
    selected = [(node.input[0], frozenset(node.input[1:])) for node in left]
    assert len(selected) == len(set(selected))
    assert len(left) <= 3


def sigmoid_pair_graph() -> onnx.ModelProto:
    """``numerics.sigmoid_pair`` as the exporter writes it: |x|, sigmoid(x), sigmoid(-x) through sign selects."""
    from onnx import TensorProto, helper

    node = helper.make_node
    nodes = [
        node("GreaterOrEqual", ["x", "zero"], ["nonnegative"]),
        node("Neg", ["x"], ["negated"]),
        node("Where", ["nonnegative", "x", "negated"], ["magnitude"]),
        node("Neg", ["magnitude"], ["minus_magnitude"]),
        node("Exp", ["minus_magnitude"], ["decay"]),
        node("Add", ["decay", "one"], ["total"]),
        node("Reciprocal", ["total"], ["inverse"]),
        node("Mul", ["decay", "inverse"], ["small"]),
        node("Where", ["nonnegative", "inverse", "small"], ["sigmoid"]),
        node("Where", ["nonnegative", "small", "inverse"], ["sigmoid_neg"]),
        node("Cast", ["nonnegative"], ["step"], to=TensorProto.FLOAT),  # the BCE's step, after the selects
    ]
    inits = [helper.make_tensor(name, TensorProto.FLOAT, [], [value]) for name, value in (("zero", 0.0), ("one", 1.0))]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])]
    outputs = [
        helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 3])
        for name in ("magnitude", "sigmoid", "sigmoid_neg", "step")
    ]
    graph = helper.make_graph(nodes, "sigmoid_pair", inputs, outputs, inits)
    return onnx_model(graph)


def test_branch_free_selects_give_the_selected_values() -> None:
    import numpy as np
    import onnxruntime as ort

    original = sigmoid_pair_graph()
    rewritten = sigmoid_pair_graph()
    assert onnx_export.branch_free_selects(rewritten) == 3
    onnx.checker.check_model(rewritten, full_check=True)
    assert sign_selects(rewritten) == [] and "Where" not in {node.op_type for node in rewritten.graph.node}
    # the abandoned Neg(x) and decay * inverse have no consumers left; the factors reuse the decay and the step
    op_types = [node.op_type for node in rewritten.graph.node]
    assert (op_types.count("Mul"), op_types.count("Exp"), op_types.count("Cast")) == (2, 1, 1)

    def run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, {"x": x})

    special = [0.0, -0.0, 1e-30, -1e-30, 0.5, -0.5, 17.9, -17.9, 20.0, -20.0, 88.0, -88.0, 104.0, -104.0, 200.0, -200.0]
    rng = np.random.default_rng(0)
    values = np.concatenate([special, [np.inf, -np.inf, np.nan], rng.uniform(-200, 200, 2000), rng.normal(0, 3, 2000)])
    for x in (values.astype(np.float32)[: 3 * (len(values) // 3)].reshape(-1, 3), np.zeros((0, 3), np.float32)):
        for got, expected in zip(run(rewritten, x), run(original, x)):
            assert got.shape == expected.shape
            np.testing.assert_array_max_ulp(got, expected, maxulp=1)  # NaN where the select gave NaN
    # the tails of sigmoid(+-x) keep their relative precision (no 1 - sigmoid cancellation)
    tails = np.array([[-20.0, -88.0, 30.0]], np.float32)
    _, sigmoid, sigmoid_neg, _ = run(rewritten, tails)
    np.testing.assert_allclose(sigmoid[0, :2], 1.0 / (1.0 + np.exp(-tails[0, :2].astype(np.float64))), rtol=1e-6)
    np.testing.assert_allclose(sigmoid_neg[0, 2], 1.0 / (1.0 + np.exp(30.0)), rtol=1e-6)


def test_branch_free_selects_leave_other_selects_alone() -> None:
    """A select on x >= 0 whose branches are not |x| / the sigmoid pair, or on x >= 1, is kept."""
    from onnx import TensorProto, helper

    node = helper.make_node
    graph = helper.make_graph(
        [
            node("GreaterOrEqual", ["x", "zero"], ["nonnegative"]),
            node("GreaterOrEqual", ["x", "one"], ["above_one"]),
            node("Neg", ["x"], ["negated"]),
            node("Exp", ["x"], ["grown"]),
            node("Where", ["nonnegative", "x", "grown"], ["kept"]),
            node("Where", ["above_one", "x", "negated"], ["shifted"]),
        ],
        "other",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N"])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N"]) for name in ("kept", "shifted")],
        [helper.make_tensor(name, TensorProto.FLOAT, [], [value]) for name, value in (("zero", 0.0), ("one", 1.0))],
    )
    model = onnx_model(graph)
    before = model.SerializeToString()
    assert onnx_export.branch_free_selects(model) == 0
    assert model.SerializeToString() == before


def test_backward_select_pairs_become_a_product_and_a_difference() -> None:
    """Where(x >= 0, v, 0) with its mirror Where(x >= 0, 0, v) -> v s and v - v s; a lone half is kept."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    def graph() -> onnx.ModelProto:
        node = helper.make_node
        nodes = [
            node("GreaterOrEqual", ["x", "zero"], ["nonnegative"]),
            node("Where", ["nonnegative", "zero", "v"], ["negative_half"]),  # the mirror first: order is free
            node("Where", ["nonnegative", "v", "zero"], ["nonnegative_half"]),
            node("Where", ["nonnegative", "w", "zero"], ["lone"]),
        ]
        values = ["x", "v", "w"]
        outputs = ["negative_half", "nonnegative_half", "lone"]
        return onnx_model(
            helper.make_graph(
                nodes, "pairs",
                [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N"]) for name in values],
                [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N"]) for name in outputs],
                [helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])],
            )
        )

    original, rewritten = graph(), graph()
    assert onnx_export.branch_free_selects(rewritten) == 2
    onnx.checker.check_model(rewritten, full_check=True)
    assert [node.op_type for node in rewritten.graph.node] == ["GreaterOrEqual", "Cast", "Mul", "Sub", "Where"]

    def run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, feed)

    rng = np.random.default_rng(0)
    x = np.concatenate([[0.0, -0.0, np.nan, np.inf, -np.inf], rng.normal(0, 3, 995)]).astype(np.float32)
    finite = {"x": x, "v": rng.normal(0, 1e30, 1000).astype(np.float32), "w": rng.normal(size=1000).astype(np.float32)}
    for got, expected in zip(run(rewritten, finite), run(original, finite)):
        np.testing.assert_array_equal(got, expected)
    # a non-finite v: the select passes it on through one half, the product through both
    poisoned = dict(finite, v=np.where(np.arange(1000) % 3 == 0, np.float32(np.nan), np.float32(np.inf)))
    got, expected = run(rewritten, poisoned), run(original, poisoned)
    assert not np.isfinite(got[0] + got[1]).any() and not np.isfinite(expected[0] + expected[1]).any()
    np.testing.assert_array_equal(got[2], expected[2])


@pytest.mark.parametrize(
    "cfg, variant, inputs, refused",
    [
        (dict(type="FocalLoss"), "onehot", {"pred": torch.zeros(3, 0), "target": torch.zeros(3, 0)}, None),
        (dict(type="SmoothL1Loss"), None, {"pred": torch.zeros(3, 0), "target": torch.zeros(3, 0)}, None),
        (dict(type="FocalLoss"), "labels", {"pred": torch.zeros(3, 0), "target": torch.zeros(3, dtype=torch.long)},
         r"input check: pred.shape\[1\] must be at least 1 \(C\)"),
        (dict(type="DistributionFocalLoss"), None, {"pred": torch.zeros(3, 1), "target": torch.zeros(3)},
         r"input check: pred.shape\[1\] must be at least 2 \(B\)"),
    ],
    ids=["focal-onehot-C0", "smoothl1-D0", "focal-labels-C0", "dfl-one-bin"],
)
def test_graphs_refuse_the_sizes_eager_refuses_and_no_other(tmp_path, cfg, variant, inputs, refused):
    """Sizes below the spec's least sizes (no classes where labels index them, one DFL bin) fail by the input's
    name, as eager's ValueError does; an empty class or value axis that eager reduces to 0 stays valid."""
    loss = build_loss(cfg)
    path = export_onnx(loss, tmp_path / "loss.onnx", variant=variant, optional_inputs=())
    run = onnx_export.load_runner(path)
    if refused is None:
        assert float(run(inputs)[0]) == float(loss(*inputs.values())) == 0.0
        return
    with pytest.raises(ValueError, match="along pred's axis 1"):
        loss(*inputs.values())
    with pytest.raises(Exception, match=refused):
        run(inputs)


# --- the exporter's registry of decompositions -----------------------------------------------------------------


def test_the_torchlib_registry_is_built_once_and_each_export_gets_its_own_copy(tmp_path, monkeypatch) -> None:
    """torch.onnx's registry of torchlib decompositions is built on the first export only (it was rebuilt on every
    call: ~0.6 s of a ~1.5 s export), every export gets a copy whose lists are its own, the models written are
    byte for byte those of an exporter that builds its own, and the exporter's class is as it was afterwards."""
    from torch.onnx._internal.exporter import _registration

    registry_class = _registration.ONNXRegistry
    original = registry_class.__dict__["from_torchlib"]
    built = []

    def counting(cls, *args, **kwargs):
        built.append(args)
        return original.__func__(cls, *args, **kwargs)

    monkeypatch.setattr(onnx_export, "_TORCHLIB_REGISTRIES", {})
    monkeypatch.setattr(registry_class, "from_torchlib", classmethod(counting))
    with onnx_export.torchlib_registry_built_once():
        handed_out = [registry_class.from_torchlib(18), registry_class.from_torchlib(18)]
    assert len(built) == 1 and registry_class.__dict__["from_torchlib"].__func__ is counting
    first, second = handed_out
    target = next(iter(first.functions))
    first.functions[target].clear()
    assert second.functions[target] and onnx_export._TORCHLIB_REGISTRIES[(registry_class, (18,), ())].functions[target]

    cfg = CONFIGS["focal"]
    export_onnx(cfg, tmp_path / "shared.onnx", verify=False)
    export_onnx(cfg, tmp_path / "shared_again.onnx", verify=False)
    assert len(built) == 2  # one more build: the exporter passes its opset by keyword
    monkeypatch.setattr(onnx_export, "torchlib_registry_built_once", contextlib.nullcontext)
    export_onnx(cfg, tmp_path / "own.onnx", verify=False)
    assert len(built) == 3
    models = [onnx.load(tmp_path / f"{name}.onnx").SerializeToString() for name in ("shared", "shared_again", "own")]
    assert models[0] == models[1] == models[2]
