"""The onnxruntime speed rewrites of ``visdet_export.export.onnx``: each keeps the exported loss's semantics.

``late_weight_masks`` drops the weight-0 selects on the inputs and selects once where the weight is applied. The
exported graphs are compared with eager PyTorch with NaN / inf planted at every weight-0 element of every float
input (they must stay out of the value and of the gradient), at N = 0, 1, 7 and 1000 on one export each (dynamic
N). Hand-built graphs check that the selects are kept wherever their values could reach anything but a
multiplication by the weight (an index, a reduction across the mask, a graph output), and the cost rule.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import onnx_model
from onnx import TensorProto, helper
from torch import Tensor, nn

from visdet_export import build_loss
from visdet_export.export import eager_joint, export_onnx
from visdet_export.export import onnx as onnx_export
from visdet_export.specs import CONFIG_VARIANTS, LossSpec, representative_configs, spec_for

CONFIGS = representative_configs()
RTOL, ATOL = 1e-4, 1e-5
SIZES = (0, 1, 7, 1000)
POISONS = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}
# Configurations whose input selects the rewrite moves (row sums, box columns, an existing output select) ...
MOVED = [
    "focal", "ce_sigmoid_labels", "qfl", "qfl_gfl", "qfl_activated", "ce_softmax", "ce_class_weight", "iou_log",
    "iou_linear", "giou", "dfl", "ce_sigmoid_centerness", "kd_kl_div", "ld",
]
# ... and some it leaves alone (mask and weight applied at the same size).
UNMOVED = ["l1", "mse", "smooth_l1", "balanced_l1"]
# Configurations whose remaining selects are a large share of the graph: they run unmasked unless a result is not
# finite; in the others (selects on N of a much larger graph) the saving is not worth the second run. KD and LD's
# (N, C) select is the guard of a teacher's masked class (0 * (-inf - log q)).
UNMASKED = ["l1", "mse", "smooth_l1", "balanced_l1", "ce_sigmoid_centerness", "kd_kl_div", "ld"]
OTHER_LAYOUTS = ["qfl", "giou", "dfl", "ce_softmax", "ce_sigmoid_centerness", "kd_kl_div"]


@dataclass
class Exported:
    loss: nn.Module
    spec: LossSpec
    names: list[str]
    model: onnx.ModelProto
    session: Any

    def draw(self, n: int, seed: int) -> dict[str, Tensor]:
        drawn = self.spec.sample(self.loss, n, seed=seed, include=self.names)
        return {name: drawn[name] for name in self.names}

    def run(self, inputs: Mapping[str, Tensor]) -> list[Tensor]:
        feed = {name: inputs[name].numpy() for name in self.names}
        return [torch.from_numpy(np.asarray(out)) for out in self.session.run(None, feed)]


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("onnx_rewrites")
    cache: dict[tuple[str, Optional[str], bool], Exported] = {}

    def get(key: str, reduction: Optional[str] = None, joint: bool = False) -> Exported:
        if (key, reduction, joint) not in cache:
            cfg = dict(CONFIGS[key], **({"reduction": reduction} if reduction else {}))
            loss = build_loss(cfg)
            spec = spec_for(loss, CONFIG_VARIANTS.get(key))
            path = export_onnx(
                loss, root / f"{key}-{reduction}-{joint}.onnx", variant=spec.variant, joint=joint, verify=False
            )
            model = onnx.load(str(path))
            names = [node.name for node in model.graph.input]
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            cache[key, reduction, joint] = Exported(loss, spec, names, model, session)
        return cache[key, reduction, joint]

    return get


def poisoned(inputs: dict[str, Tensor], value: float) -> dict[str, Tensor]:
    """Every float input (but the weight and avg_factor) set to ``value`` where the weight is 0."""
    unweighted = inputs["weight"] == 0
    out = dict(inputs)
    for name, tensor in inputs.items():
        if name in ("weight", "avg_factor") or not tensor.is_floating_point() or tensor.dim() < unweighted.dim():
            continue
        mask = unweighted.reshape(unweighted.shape + (1,) * (tensor.dim() - unweighted.dim()))
        out[name] = torch.where(mask, torch.tensor(value, dtype=tensor.dtype), tensor)
    return out


def assert_matches(actual: Tensor, expected: Tensor) -> None:
    assert tuple(actual.shape) == tuple(expected.shape)
    assert torch.isfinite(actual).all(), "a masked NaN / inf leaked into the onnxruntime result"
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL)


# --- exported losses: values with NaN / inf at weight 0 ---------------------------------------------------------


@pytest.mark.parametrize("poison", list(POISONS))
@pytest.mark.parametrize("key", MOVED + UNMOVED)
def test_weight_zero_elements_stay_masked(exports: Any, key: str, poison: str) -> None:
    art = exports(key)
    for n in SIZES:
        inputs = poisoned(art.draw(n, seed=n), POISONS[poison])
        (out,) = art.run(inputs)
        with torch.no_grad():
            expected = art.spec.call(art.loss, inputs)
        assert_matches(out, expected)
        if n == 0:
            assert float(out) == 0.0


@pytest.mark.parametrize("key", OTHER_LAYOUTS)
def test_weight_zero_elements_stay_masked_elementwise_and_joint(exports: Any, key: str) -> None:
    none, joint = exports(key, reduction="none"), exports(key, joint=True)
    for n in SIZES:
        inputs = poisoned(joint.draw(n, seed=30 + n), float("nan"))  # "none" takes no avg_factor
        (out,) = none.run(inputs)
        with torch.no_grad():
            expected = none.spec.call(none.loss, inputs)
        assert_matches(out, expected)
        value, grad = joint.run(inputs)
        expected_value, expected_grad = eager_joint(joint.loss, joint.spec, inputs)
        assert_matches(value, expected_value)
        assert_matches(grad, expected_grad)
        unweighted = inputs["weight"] == 0
        assert (grad[unweighted] == 0).all()


def masked_path(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The nodes of the masked graph: the ``If``'s else branch where ``unmasked_while_finite`` made one."""
    for node in model.graph.node:
        if node.op_type == "If":
            (branch,) = [attribute.g for attribute in node.attribute if attribute.name == "else_branch"]
            return list(branch.node)
    return list(model.graph.node)


def selects_reading(
    nodes: list[onnx.NodeProto], graph_input: str, model: onnx.ModelProto
) -> list[onnx.NodeProto]:
    """The weight-0 selects among ``nodes`` (their condition computed from the ``weight`` input, in ``nodes`` or
    ``model``'s graph) whose value input is ``graph_input`` or a slice / (un)squeeze of it. Selects on other
    conditions are not masks: the activated BCE's ``Where(p (1 - p) >= eps, p, 1/2)`` is arithmetic."""
    producer = {output: node for node in [*model.graph.node, *nodes] for output in node.output}

    def reads(name: str) -> bool:
        while name.removesuffix("__visdet_masked") != graph_input:
            node = producer.get(name)
            if node is None or node.op_type not in ("Slice", "Squeeze", "Unsqueeze", "Split", "Identity"):
                return False
            name = node.input[0]
        return True

    def from_weight(name: str) -> bool:
        pending, seen = [name], set()
        while pending:
            name = pending.pop()
            if name == "weight":
                return True
            if name in producer and name not in seen:
                seen.add(name)
                pending.extend(producer[name].input)
        return False

    return [node for node in nodes if node.op_type == "Where" and reads(node.input[1]) and from_weight(node.input[0])]


@pytest.mark.parametrize("key", MOVED)
def test_input_selects_moved(exports: Any, key: str) -> None:
    """The masked graph selects no pred (or column of it): the weight-0 select is where the weight is applied."""
    for art in (exports(key), exports(key, joint=True) if key in OTHER_LAYOUTS else None):
        if art is None:
            continue
        nodes = masked_path(art.model)
        assert "Where" in {node.op_type for node in nodes} and not selects_reading(nodes, "pred", art.model)


@pytest.mark.parametrize("key", UNMOVED)
def test_input_selects_kept_where_nothing_is_saved(exports: Any, key: str) -> None:
    nodes = masked_path(exports(key).model)
    assert "Where" in {node.op_type for node in nodes}
    assert not any(output.endswith("__visdet_weighted") for node in nodes for output in node.output)


@pytest.mark.parametrize("key", [key for key in MOVED + UNMOVED if key not in UNMASKED])
def test_masked_graph_alone_where_selects_are_cheap(exports: Any, key: str) -> None:
    assert "If" not in {node.op_type for node in exports(key).model.graph.node}


@pytest.mark.parametrize("key", UNMASKED)
def test_unmasked_pass_selects_less(exports: Any, key: str) -> None:
    """The graph that runs unless a result is not finite has fewer selects than the masked one, none of pred."""
    model = exports(key).model
    main = list(model.graph.node)
    assert [node.op_type for node in main].count("If") == 1
    selects = [node for node in main if node.op_type == "Where"]
    assert len(selects) < sum(node.op_type == "Where" for node in masked_path(model))
    assert not selects_reading(main, "pred", model)


# --- hand-built graphs ---------------------------------------------------------------------------------------------


def masked_graph(
    body: list[onnx.NodeProto], outputs: Mapping[str, Optional[list[Any]]], weight_shape: list[Any]
) -> onnx.ModelProto:
    """x (N, 4) masked where ``w`` is 0 (``w`` (N,) as a row weight, or (N, 4)), followed by ``body``."""
    node = helper.make_node
    row = len(weight_shape) == 1
    nodes = [
        node("Unsqueeze", ["w", "last"], ["w_col"]) if row else node("Identity", ["w"], ["w_col"]),
        node("Equal", ["w_col", "zero"], ["is_zero"]),
        node("Not", ["is_zero"], ["keep"]),
        node("Where", ["keep", "x", "zero"], ["xm"]),
        *body,
    ]
    inits = [
        helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
        helper.make_tensor("last", TensorProto.INT64, [1], [-1]),
        helper.make_tensor("one_axis", TensorProto.INT64, [1], [1]),
    ]
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
        helper.make_tensor_value_info("w", TensorProto.FLOAT, weight_shape),
    ]
    results = [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in outputs.items()]
    graph = helper.make_graph(nodes, "masked", inputs, results, inits)
    return onnx_model(graph)


def run_graph(model: onnx.ModelProto, x: np.ndarray, w: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x, "w": w})


def row_inputs(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 3, (n, 4)).astype(np.float32)
    w = np.where(rng.random(n) < 0.3, 0.0, rng.random(n) + 0.1).astype(np.float32)
    x[w == 0] = np.array([np.nan, np.inf, -np.inf, 1e38], np.float32)
    return x, w


def test_row_select_moves_past_the_row_sum() -> None:
    """QFL's layout: exp / log of the masked rows, a row sum, the row weight: one (N,) select instead of (N, 4)."""
    node = helper.make_node
    body = [
        node("Exp", ["xm"], ["e"]),
        node("Log", ["e"], ["l"]),
        node("Mul", ["l", "e"], ["le"]),
        node("ReduceSum", ["le", "one_axis"], ["rows"], keepdims=0),
        node("Mul", ["rows", "w"], ["weighted"]),
        node("ReduceSum", ["weighted"], ["total"], keepdims=0),
    ]
    original = masked_graph(body, {"total": [], "weighted": ["N"]}, ["N"])
    rewritten = masked_graph(body, {"total": [], "weighted": ["N"]}, ["N"])
    assert onnx_export.late_weight_masks(rewritten) == 1
    onnx.checker.check_model(rewritten, full_check=True)
    selects = [n for n in rewritten.graph.node if n.op_type == "Where"]
    assert len(selects) == 1 and selects[0].input[2] == "rows"
    assert not {"Not", "Unsqueeze"} & {n.op_type for n in rewritten.graph.node}
    for n in (0, 1, 7, 1000):
        x, w = row_inputs(n, seed=n)
        got, expected = run_graph(rewritten, x, w), run_graph(original, x, w)
        for a, b in zip(got, expected):
            assert np.isfinite(a).all()
            np.testing.assert_array_equal(a, b)  # the same products; weight-0 ones are 0 (the sign may differ)


def test_an_operand_weighted_twice_gets_one_select() -> None:
    """Two products of the same row sum with the weight (sigmoid CE with class weights exports such a pair): one
    select feeds both, where a select per product repeated its output name (the graph failed onnx.checker)."""
    node = helper.make_node
    body = [
        node("Exp", ["xm"], ["e"]),
        node("ReduceSum", ["e", "one_axis"], ["rows"], keepdims=0),
        node("Mul", ["rows", "w"], ["weighted"]),
        node("Mul", ["w", "rows"], ["weighted_again"]),
        node("Add", ["weighted", "weighted_again"], ["both"]),
        node("ReduceSum", ["both"], ["total"], keepdims=0),
    ]
    original = masked_graph(body, {"total": []}, ["N"])
    rewritten = masked_graph(body, {"total": []}, ["N"])
    assert onnx_export.late_weight_masks(rewritten) == 1
    onnx.checker.check_model(rewritten, full_check=True)
    selects = [n for n in rewritten.graph.node if n.op_type == "Where"]
    assert len(selects) == 1 and selects[0].input[2] == "rows"
    for n in (0, 7, 1000):
        x, w = row_inputs(n, seed=n)
        (got,), (expected,) = run_graph(rewritten, x, w), run_graph(original, x, w)
        assert np.isfinite(got) and got == expected


def test_selects_kept_when_the_values_reach_more_than_the_weight() -> None:
    node = helper.make_node
    cases = {
        # the masked value becomes an index (garbage there could be out of range)
        "index": ([
            node("Cast", ["xm"], ["i"], to=TensorProto.INT64),
            node("GatherElements", ["x", "i"], ["g"], axis=1),
            node("ReduceSum", ["g", "one_axis"], ["rows"], keepdims=0),
            node("Mul", ["rows", "w"], ["out"]),
        ], ["N"]),
        # a graph output
        "output": ([node("Abs", ["xm"], ["out"]), node("Mul", ["out", "w_col"], ["weighted"])], ["N"]),
        # a per-element mask summed across its own axis before the weight is applied
        "across": ([
            node("ReduceSum", ["xm", "one_axis"], ["rows"], keepdims=1),
            node("Mul", ["rows", "w_col"], ["out"]),
        ], ["N", 4]),
        # multiplied by another tensor than the weight
        "other": ([node("Mul", ["xm", "x"], ["out"])], ["N"]),
        # same-size mask and weight (L1): nothing to save
        "same_size": ([node("Abs", ["xm"], ["a"]), node("Mul", ["a", "w_col"], ["out"])], ["N", 4]),
    }
    for name, (body, weight_shape) in cases.items():
        outputs = {"out": None, "weighted": None} if name == "output" else {"out": None}
        model = masked_graph(body, outputs, weight_shape)
        before = model.SerializeToString()
        assert onnx_export.late_weight_masks(model) == 0, name
        assert model.SerializeToString() == before, name


def elementwise_graph(tail: list[onnx.NodeProto], outputs: Mapping[str, Optional[list[Any]]]) -> onnx.ModelProto:
    """L1's layout: x (N, 4) masked where w (N, 4) is 0, ``|.| * w`` as "weighted", then ``tail``."""
    node = helper.make_node
    body = [node("Abs", ["xm"], ["a"]), node("Mul", ["a", "w_col"], ["weighted"]), *tail]
    return masked_graph(body, outputs, ["N", 4])


def element_inputs(n: int, seed: int, poison: bool) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 3, (n, 4)).astype(np.float32)
    w = np.where(rng.random((n, 4)) < 0.3, 0.0, rng.random((n, 4)) + 0.1).astype(np.float32)
    if poison:
        unweighted = np.flatnonzero(w.reshape(-1) == 0)
        x.reshape(-1)[unweighted] = np.resize(np.array([np.nan, np.inf, -np.inf, 1e38], np.float32), unweighted.size)
    return x, w


def test_unmasked_while_finite_gives_the_masked_values() -> None:
    """Finite results come from the unmasked nodes, the others from the masked graph: the same values either way."""
    node = helper.make_node
    tail = [node("ReduceSum", ["weighted"], ["total"], keepdims=0)]
    outputs = {"total": [], "weighted": ["N", 4]}
    original, rewritten = elementwise_graph(tail, outputs), elementwise_graph(tail, outputs)
    assert onnx_export.unmasked_while_finite(rewritten) == 1
    onnx.checker.check_model(rewritten, full_check=True)
    main = [n.op_type for n in rewritten.graph.node]
    assert "Where" not in main and main.count("If") == 1
    big = np.full((1, 4), 3e38, np.float32), np.ones((1, 4), np.float32)  # a kept overflow: inf, via the masked graph
    for x, w in [element_inputs(n, n, poison) for n in (0, 1, 7, 1000) for poison in (False, True)] + [big]:
        got, expected = run_graph(rewritten, x, w), run_graph(original, x, w)
        for a, b in zip(got, expected):
            np.testing.assert_array_equal(a, b)  # equal_nan: none expected here, inf where the original has it
        assert np.isfinite(got[1]).all()


def test_unmasked_while_finite_needs_a_nan_to_reach_the_outputs() -> None:
    """After the weight, only operators that keep a NaN: a max, clip or select could hide 0 * inf = NaN."""
    node = helper.make_node
    tails = {
        "max": [node("Max", ["weighted", "zero"], ["m"]), node("ReduceSum", ["m"], ["out"], keepdims=0)],
        "clip": [node("Clip", ["weighted", "zero"], ["m"]), node("ReduceSum", ["m"], ["out"], keepdims=0)],
        "compare": [node("Greater", ["weighted", "zero"], ["g"]), node("Where", ["g", "weighted", "zero"], ["m"]),
                    node("ReduceSum", ["m"], ["out"], keepdims=0)],
    }
    for name, tail in tails.items():
        model = elementwise_graph(tail, {"out": []})
        before = model.SerializeToString()
        assert onnx_export.unmasked_while_finite(model) == 0, name
        assert model.SerializeToString() == before, name


def guard_graph(tail: list[onnx.NodeProto]) -> onnx.ModelProto:
    """The exported BCE's linear term: ``x ([x >= 0] - t)``, 0 where the difference is 0 (an exactly right infinite
    logit: inf * 0), for logits x and targets w (N, 4), then ``tail`` from "guarded" to "out"."""
    node = helper.make_node
    nodes = [
        node("GreaterOrEqual", ["x", "zero"], ["nonnegative"]),
        node("Cast", ["nonnegative"], ["step"], to=TensorProto.FLOAT),
        node("Sub", ["step", "w"], ["difference"]),
        node("Mul", ["x", "difference"], ["product"]),
        node("Equal", ["difference", "zero"], ["agree"]),
        node("Where", ["agree", "zero", "product"], ["guarded"]),
        *tail,
    ]
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 4]) for name in ("x", "w")]
    graph = helper.make_graph(
        nodes, "guard", inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT, [])],
        [helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])],
    )
    return onnx_model(graph)


def test_unmasked_while_finite_skips_the_exactly_right_logit_guard() -> None:
    """The guard is needed only where a logit is infinite: the unmasked pass runs the bare product, and inputs with
    an exactly right infinite logit (NaN there) take the guarded graph. Behind a max it stays."""
    node = helper.make_node
    total = [node("ReduceSum", ["guarded"], ["out"], keepdims=0)]
    original, rewritten = guard_graph(total), guard_graph(total)
    assert onnx_export.unmasked_while_finite(rewritten) == 1
    onnx.checker.check_model(rewritten, full_check=True)
    assert [n.op_type for n in rewritten.graph.node].count("Where") == 0
    rng = np.random.default_rng(0)
    x = rng.normal(0, 3, (50, 4)).astype(np.float32)
    w = rng.choice(np.array([0.0, 1.0, 0.25], np.float32), (50, 4))
    right = np.where(w == 0, -np.inf, np.inf).astype(np.float32)
    for logits in (x, np.where(w != 0.25, right, x)):  # finite; exactly right infinities
        (got,), (expected,) = run_graph(rewritten, logits, w), run_graph(original, logits, w)
        assert np.isfinite(expected) and got == expected
    behind_a_max = [node("Max", ["guarded", "zero"], ["m"]), node("ReduceSum", ["m"], ["out"], keepdims=0)]
    model = guard_graph(behind_a_max)
    assert onnx_export.unmasked_while_finite(model) == 0


def test_unmasked_while_finite_leaves_passthrough_outputs_alone() -> None:
    """A graph input that is also an output has no producer to rename: the graph is left as it is."""
    node = helper.make_node
    model = elementwise_graph([node("ReduceSum", ["weighted"], ["total"], keepdims=0)], {"total": [], "x": ["N", 4]})
    before = model.SerializeToString()
    assert onnx_export.unmasked_while_finite(model) == 0
    assert model.SerializeToString() == before


# --- compensated_log1p -----------------------------------------------------------------------------------------------


def softplus_graph(extra_consumer: bool = False) -> onnx.ModelProto:
    """``numerics.sigmoid_pair``'s exported layout: ``d = 1 + exp(-|x|)``, its reciprocal, ``max(x, 0) + log(d)``."""
    node = helper.make_node
    nodes = [
        node("Abs", ["x"], ["a"]), node("Neg", ["a"], ["na"]), node("Exp", ["na"], ["e"]),
        node("Add", ["e", "one"], ["d"]), node("Reciprocal", ["d"], ["r"]), node("Log", ["d"], ["l"]),
        node("Max", ["x", "zero"], ["c"]), node("Add", ["c", "l"], ["softplus"]),
    ]
    outputs = ["r", "softplus", "l"]
    if extra_consumer:
        nodes.append(node("Mul", ["d", "x"], ["other"]))
        outputs.append("other")
    inits = [
        helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
        helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
    ]
    graph = helper.make_graph(
        nodes, "softplus", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N"])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N"]) for name in outputs], inits,
    )
    return onnx_model(graph)


def _session(model: onnx.ModelProto) -> Any:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_compensated_log1p_keeps_the_relative_precision() -> None:
    """``Log(1 + exp(-|x|))`` gets the sum's rounding error back: within 4e-7 relative of float64 (float32
    denormals aside; onnxruntime's ``Exp`` is ~2 ulp) where the plain ``Log`` is 0 from |x| ~ 16.6; the reciprocal
    is untouched."""
    original, rewritten = softplus_graph(), softplus_graph()
    assert onnx_export.compensated_log1p(rewritten) == 1
    onnx.checker.check_model(rewritten, full_check=True)
    ops = [n.op_type for n in rewritten.graph.node]
    assert len(ops) == len(original.graph.node) + 3 and ops.count("Log") == 1 and ops.count("Sub") == 2
    x = np.concatenate([
        np.linspace(-120, 120, 200001), [0.0, -0.0, 16.6, 17.0, 18.0, -17.0, -20.0, -88.0, 88.0, 1e30, -1e30],
    ]).astype(np.float32)
    exact_x = x.astype(np.float64)
    log1p_exp = np.log1p(np.exp(-np.abs(exact_x)))
    exact = [1 / (1 + np.exp(-np.abs(exact_x))), np.maximum(exact_x, 0) + log1p_exp, log1p_exp]
    got, before = _session(rewritten).run(None, {"x": x}), _session(original).run(None, {"x": x})
    for a, e in zip(got, exact):
        np.testing.assert_allclose(a, e, rtol=4e-7, atol=np.finfo(np.float32).tiny)
    at_17 = np.flatnonzero(x == -17.0)[0]
    assert abs(before[2][at_17] / exact[2][at_17] - 1) > 0.5  # the exporter's Log(1 + exp(-|x|)): 0 there
    special = np.array([np.nan, np.inf, -np.inf], np.float32)
    for a, b in zip(_session(rewritten).run(None, {"x": special}), _session(original).run(None, {"x": special})):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("key", ["focal", "qfl", "ce_sigmoid_labels"])
def test_exported_logs_are_compensated_and_sigmoids_see_magnitudes(exports: Any, key: str) -> None:
    """onnxruntime's ``Sigmoid`` is 0 below -18 and loses its relative precision below 0: any in the exported
    graphs (loss and joint) reads an ``Abs``, no ``Log`` reads one, and every ``Log(1 + exp(.))`` is
    :func:`~visdet_export.export.onnx.compensated_log1p`'s."""
    for model in (exports(key).model, exports(key, joint=True).model):
        branches = [a.g for node in model.graph.node for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]
        nodes = list(model.graph.node) + [n for branch in branches for n in branch.node]
        producers = {out: n for n in nodes for out in n.output}
        assert all(producers[n.input[0]].op_type == "Abs" for n in nodes if n.op_type == "Sigmoid")
        logs = [n for n in nodes if n.op_type == "Log" and n.input[0] in producers]
        assert logs and all(producers[n.input[0]].op_type != "Sigmoid" for n in logs)
        of_sums = [n for n in logs if producers[n.input[0]].op_type == "Add"]
        assert of_sums and all(n.output[0].endswith("__visdet_rounded") for n in of_sums)


def _confident(art: Exported, seed: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Inputs with every logit 15 to 17 away from its decision, wrong for a quarter of the positives; and their
    float64 copy."""
    inputs = art.draw(500, seed=seed)
    pred = inputs[art.spec.pred]
    generator = torch.Generator().manual_seed(seed)
    confident = -(15.0 + 2.0 * torch.rand(pred.shape, generator=generator))
    labels = inputs["labels" if "labels" in inputs else "target"]
    positive = torch.nn.functional.one_hot(labels.clamp(0, pred.size(-1)), pred.size(-1) + 1)[:, :-1].bool()
    positive &= torch.rand(pred.shape, generator=generator) < 0.75
    inputs[art.spec.pred] = torch.where(positive, -confident, confident).to(pred.dtype)
    return inputs, {name: t.double() if t.is_floating_point() else t for name, t in inputs.items()}


@pytest.mark.parametrize("key", ["focal", "ce_sigmoid_labels", "qfl"])
def test_confident_logits_keep_their_relative_precision(exports: Any, key: str) -> None:
    """A trained detector's logits, far from their decisions (where ``log1p(exp(-|x|))`` is ~1e-7 and its float32
    ``Log(1 + .)`` 0 or 1.2e-7): each element of the "none" loss within 1e-5 relative of float64 eager, of the joint
    graph's gradient within 1e-4 (float32 eager's QFL gradient is 2.3e-5 off there), without absolute slack
    (measured before ``export.onnx.compensated_log1p``: elements up to 100% off, the sigmoid CE mean 7.9e-3)."""
    none, joint = exports(key, reduction="none"), exports(key, joint=True)
    inputs, exact = _confident(none, seed=4)
    with torch.no_grad():
        want = none.spec.call(copy.deepcopy(none.loss).double(), exact)
    got = none.run(inputs)[0].double()
    kept = want != 0
    torch.testing.assert_close(got[kept], want[kept], rtol=1e-5, atol=0.0)
    inputs, exact = _confident(joint, seed=5)
    leaf = exact[joint.spec.pred].clone().requires_grad_(True)
    value = joint.spec.call(copy.deepcopy(joint.loss).double(), {**exact, joint.spec.pred: leaf})
    (want_grad,) = torch.autograd.grad(value, leaf)
    got_value, got_grad = (out.double() for out in joint.run(inputs))
    torch.testing.assert_close(got_value, value.detach(), rtol=1e-5, atol=0.0)
    kept = want_grad != 0
    torch.testing.assert_close(got_grad[kept], want_grad[kept], rtol=1e-4, atol=0.0)


def _audited_inputs(key: str) -> dict[str, Tensor]:
    """float32 inputs of the regimes of README's float32 audit (Mixed precision): nearly identical boxes (GIoU),
    DFL at its optimum with both bins confident, confident mask logits on soft targets, LD with a confident teacher
    and a student confident elsewhere."""
    g = torch.Generator().manual_seed(0)
    f64 = torch.float64
    if key == "giou":
        centre, half = 10.0 + torch.rand(500, 2, generator=g, dtype=f64), 0.25 + 0.5 * torch.rand(500, 2, generator=g)
        target = torch.cat([centre - half, centre + half], dim=1).float()
        return {"pred": (target.double() + 1e-5 * torch.randn(500, 4, generator=g, dtype=f64)).float(),
                "target": target}
    if key == "dfl":
        target = (1.0 + 15.0 * torch.rand(256, generator=g, dtype=f64)).float().double()
        left, rows = target.floor().long(), torch.arange(256)
        logits = -30.0 - torch.rand(256, 17, generator=g, dtype=f64)
        logits[rows, left], logits[rows, left + 1] = torch.log(left + 1 - target), torch.log(target - left)
        return {"pred": logits.float(), "target": target.float()}
    if key == "ce_mask":
        mask = torch.rand(8, 5, 6, generator=g) < 0.5
        sign = torch.where(mask.unsqueeze(1), 1.0, -1.0).double()
        magnitude = 8.0 * torch.exp(2.3 * torch.rand(8, 3, 5, 6, generator=g, dtype=f64))
        return {"pred": (sign * magnitude).float(), "target": torch.where(mask, 1.0 - 1e-4, 1e-4).float(),
                "label": torch.randint(0, 3, (8,), generator=g)}
    teacher, student = (torch.randn(64, 4, 17, generator=g, dtype=f64) * 0.5 for _ in range(2))
    teacher[..., 5] += 30.0
    student[..., 9] += 30.0
    return {"pred": student.reshape(64, -1).float(), "soft_label": teacher.reshape(64, -1).float()}


@pytest.mark.parametrize("key", ["giou", "dfl", "ce_mask", "ld"])
def test_audited_regimes_match_float64_math_in_onnxruntime(exports: Any, key: str) -> None:
    """The joint graphs in the regimes of README's float32 audit, as eager's tests in test_edge_cases.py and
    test_distillation.py check them: GIoU of boxes 1e-5 apart (value within ~1 ulp of 1 absolute, gradient within
    1e-6 of each box's largest component), DFL at its optimum (gradient within 2 ulps of 1 absolute: the rounding
    of p), mask CE of confident logits on soft targets and LD away from its teacher (element by element)."""
    art = exports(key, reduction="none", joint=True)
    inputs = _audited_inputs(key)
    feed = {name: inputs.get(name, torch.ones(inputs["pred"].size(0))) for name in art.names}
    value, grad = (out.double() for out in art.run(feed))
    leaf = inputs["pred"].double().requires_grad_(True)
    exact_inputs = {name: t.double() if t.is_floating_point() else t for name, t in feed.items()}
    exact = art.spec.call(copy.deepcopy(art.loss).double(), {**exact_inputs, "pred": leaf})  # float64 math
    (exact_grad,) = torch.autograd.grad(exact.sum(), leaf)
    exact, scale = exact.detach(), float(art.loss.loss_weight)
    rows = exact_grad.reshape(exact_grad.size(0), -1).abs().amax(1)
    normwise = (grad - exact_grad).reshape(grad.size(0), -1).abs().amax(1) / rows
    if key == "giou":
        torch.testing.assert_close(value, exact, rtol=0, atol=2.0**-22 * scale)
        assert float(normwise.max()) < 1e-6
    elif key == "dfl":
        torch.testing.assert_close(grad, exact_grad, rtol=0, atol=2.0**-22 * scale)
    else:
        torch.testing.assert_close(value, exact, rtol=1e-5 if key == "ld" else 1e-6, atol=0)
        if key == "ce_mask":
            torch.testing.assert_close(grad, exact_grad, rtol=1e-6, atol=0)
        else:
            assert float(normwise.max()) < 2e-6


def _tied_graph() -> onnx.ModelProto:
    """out = a * b and total = sum(a) * s, with a, b of N values and s 0-d: the shapes checked_input_shapes ties."""
    floats = [
        helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N"]),
        helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N"]),
        helper.make_tensor_value_info("s", TensorProto.FLOAT, []),
    ]
    nodes = [
        helper.make_node("Mul", ["a", "b"], ["out"]),
        helper.make_node("ReduceSum", ["a"], ["sum"], keepdims=0),
        helper.make_node("Mul", ["sum", "s"], ["total"]),
    ]
    outputs = [
        helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N"]),
        helper.make_tensor_value_info("total", TensorProto.FLOAT, []),
    ]
    graph = helper.make_graph(nodes, "tied", floats, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def test_accurate_total_sums_sum_as_precisely_as_float64() -> None:
    """onnxruntime's float32 whole-tensor ReduceSum loses ~6e-4 relative over 8M positive values; the pass sums rows
    first and the row sums in float64 (a sum-reduced loss without per-row weight sums its (N, C) elements so)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "C"])
    total = helper.make_tensor_value_info("total", TensorProto.FLOAT, [])
    graph = helper.make_graph([helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0)], "sum", [x], [total])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    # BCE-like elements, softplus of logits 3 x N(0, 1)
    values = np.log1p(np.exp(np.random.default_rng(0).standard_normal((100_000, 80)) * 3)).astype(np.float32)
    exact = values.astype(np.float64).sum()
    assert onnx_export.accurate_total_sums(model) == 1
    assert any(n.op_type == "Cast" and n.attribute[0].i == TensorProto.DOUBLE for n in model.graph.node)
    accurate = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert abs(float(accurate.run(None, {"x": values})[0]) / exact - 1) < 1e-7  # onnxruntime 1.32 alone: 6.5e-4


def test_checked_input_shapes_refuse_axes_below_their_least_size() -> None:
    """A class axis of 0 (DFL: fewer than 2 bins) failed in a gather of the loss, naming no input; N = 0 is valid."""
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "C"]),
              helper.make_tensor_value_info("bins", TensorProto.FLOAT, ["N", "B"])]
    nodes = [helper.make_node("ReduceSum", ["x"], ["sx"], keepdims=0), helper.make_node("ReduceSum", ["bins"], ["sb"],
                                                                                         keepdims=0),
             helper.make_node("Add", ["sx", "sb"], ["total"])]
    graph = helper.make_graph(nodes, "least", inputs, [helper.make_tensor_value_info("total", TensorProto.FLOAT, [])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    assert onnx_export.checked_input_shapes(model, {"C": 1, "B": 2}) == 3  # bins' N is x's; C >= 1, B >= 2
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ones = {"x": np.ones((3, 1), np.float32), "bins": np.ones((3, 2), np.float32)}
    assert session.run(None, ones)[0] == 9.0
    assert session.run(None, {"x": np.ones((0, 1), np.float32), "bins": np.ones((0, 2), np.float32)})[0] == 0.0
    with pytest.raises(Exception, match=r"input check: x.shape\[1\] must be at least 1 \(C\)"):
        session.run(None, {**ones, "x": np.ones((3, 0), np.float32)})
    with pytest.raises(Exception, match=r"input check: bins.shape\[1\] must be at least 2 \(B\)"):
        session.run(None, {**ones, "bins": np.ones((3, 1), np.float32)})


def test_checked_input_shapes_refuse_disagreeing_sizes_and_change_no_bit() -> None:
    model = _tied_graph()
    plain = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert onnx_export.checked_input_shapes(model) == 2  # s is 0-d, b's axis is a's
    onnx.checker.check_model(model, full_check=True)
    checked = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {"a": np.array([-0.0, 1.5, -2.0], np.float32), "b": np.array([1.0, np.nan, np.inf], np.float32),
             "s": np.array(-1.0, np.float32)}
    for want, got in zip(plain.run(None, feeds), checked.run(None, feeds)):
        assert want.shape == got.shape
        np.testing.assert_array_equal(np.signbit(got), np.signbit(want))  # -0.0 stays -0.0
        np.testing.assert_array_equal(got, want)
    empty = {"a": np.zeros(0, np.float32), "b": np.zeros(0, np.float32), "s": np.array(2.0, np.float32)}
    assert [out.shape for out in checked.run(None, empty)] == [(0,), ()]
    for name, wrong in [("b", np.zeros(2, np.float32)), ("b", np.zeros(4, np.float32)),
                        ("b", np.zeros(1, np.float32)), ("s", np.zeros(2, np.float32))]:
        with pytest.raises(Exception, match=f"input check: {name}"):
            checked.run(None, {**feeds, name: wrong})
