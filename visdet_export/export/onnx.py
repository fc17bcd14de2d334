"""ONNX export of a loss (optionally with its gradient), and an onnxruntime runner for the written files.

:func:`export_onnx` traces the loss with ``torch.onnx.export(..., dynamo=True)``: one dynamic sample count N
(min 0) shared by every N-sized input, the free class / bin / mask sizes dynamic too (min 1; those a configuration
fixes, such as a class weight's classes, static), the hyper-parameters as constants (and, as
the loss config in JSON, in the model's ``metadata_props``). Graph inputs are the spec's input names (the
included optional ones among them: ``weight``, and ``avg_factor`` as a 0-d float tensor); outputs are ``loss``
and, for ``joint=True``, ``grad_pred`` (see :mod:`.joint`). The file is written atomically, checked with
``onnx.checker.check_model(full_check=True)``, compared with eager in onnxruntime before it is renamed into
place, and described by a manifest (``<path>.json``).

The losses avoid the exporter traps measured on this stack (torch 2.13, onnxruntime 1.2x): BCE is written in the
stable softplus form (the built-in lowers to ``Log(Sigmoid(x))``, which onnxruntime turns into inf/NaN for
|x| >= 18), cross-entropy is ``log_softmax`` + ``gather`` (``SoftmaxCrossEntropyLoss`` fails at N = 0 and its
``.sum()`` is lost), and counts are tensors (a ``numel()`` would be frozen into the graph). The tests prove it
on the exported graphs.

Post-export passes then make the written graphs faster in onnxruntime (CPU) without changing their values, or
more precise: :func:`branch_free_selects`, :func:`late_weight_masks`,
:func:`unmasked_while_finite`, :func:`compensated_log1p` and :func:`accurate_total_sums` (precision); each documents
what it rewrites and why. :func:`one_sided_clips` keeps infinities where ONNX's ``Clip`` would clamp them;
:func:`nonnegative_reduce_axes` lets onnxruntime releases before 1.32 run the graphs at N = 0,
:func:`checked_input_shapes` makes onnxruntime refuse inputs whose sizes disagree (it only warns about declared
shapes), and :func:`drop_unused_initializers` removes what the exporter and the passes leave unread.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor

from .artifacts import (
    COMPILER_MODULES,
    ArtifactError,
    ExportPlan,
    LossOrConfig,
    atomic_output,
    describe_inputs,
    evaluation_mode,
    first_line,
    one_export_at_a_time,
    raise_hidden_interrupt,
    write_manifest,
)
from .joint import DEFAULT_OPTIONAL_INPUTS, EXAMPLE_N, dynamic_dims, dynamic_shapes, example_inputs, joint_module
from .verify import TOLERANCES, check_parity

#: Imported before the first export with a Ctrl-C held back (``artifacts.import_uninterrupted``): the compiler stack
#: and torch's ONNX exporter with onnxscript (0.6 s more).
ONNX_EXPORTER_MODULES = (*COMPILER_MODULES, "torch.onnx._internal.exporter._core")

#: The lowest opset the loss graphs are exported at (torch's dynamo exporter targets 18 and later).
MIN_OPSET = 18
#: Sizes the export-time parity check runs at; the largest is capped for inputs with many elements per sample.
EXPORT_PARITY_SIZES = (0, 1, EXAMPLE_N, 1024)
#: ``metadata_props`` keys written into every model.
METADATA_PREFIX = "visdet_export."
#: The key of the losses :func:`~visdet_export.export.attach.attach_losses` merged into a model: such a model holds
#: several losses, its own keys under each loss's output name (``loss_kd/visdet_export.config``).
ATTACHED_METADATA_KEY = METADATA_PREFIX + "attached_losses"

# Exporter messages that are noise for our graphs. They are silenced only while our export runs.
_NOISY_LOGGERS = ("torch.onnx", "torch.export", "torch._export", "torch._dynamo", "torch.fx", "onnxscript")
_NOISY_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\).*",
    r".*The axis name: .* will not be used.*",
    r".*torch\.jit\..* is deprecated.*",
)


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """Silence the exporter's known log messages and warnings while the block runs, then restore both.

    Other warnings (a ``TracerWarning`` from a loss, say) still reach the caller.
    """
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            for pattern in _NOISY_WARNINGS:
                warnings.filterwarnings("ignore", message=pattern)
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


#: torch.onnx's registries of torchlib decompositions built in this process, by the arguments they were built with
#: (see :func:`torchlib_registry_built_once`).
_TORCHLIB_REGISTRIES: dict[Any, Any] = {}


@contextlib.contextmanager
def torchlib_registry_built_once() -> Iterator[None]:
    """While the block runs, torch.onnx's exporter takes a copy of a registry of torchlib's decompositions built once
    a process instead of building its own: ``torch.onnx.export(dynamo=True)`` builds it on every call, parsing the
    source of every onnxscript function it registers (~0.6 s of a ~1.5 s loss export, torch 2.13 / onnxscript 0.7).
    The registry depends only on the opset and the installed packages (and on what was registered into onnxscript's
    torchlib before the first export). Each copy holds lists of its own, so what an exporter registers into one
    (``custom_translation_table``) reaches no other. Where torch's exporter builds no such
    registry (another torch), the block runs as it is. It patches a class attribute: hold EXPORT_LOCK."""
    try:
        from torch.onnx._internal.exporter import _registration

        registry_class = _registration.ONNXRegistry
        original = registry_class.__dict__["from_torchlib"]
        build = original.__func__
    except (ImportError, AttributeError, KeyError):
        yield
        return

    def from_torchlib(cls: type, *args: Any, **kwargs: Any) -> Any:
        key = (cls, args, tuple(sorted(kwargs.items())))
        if key not in _TORCHLIB_REGISTRIES:
            _TORCHLIB_REGISTRIES[key] = build(cls, *args, **kwargs)
        registry = copy.copy(_TORCHLIB_REGISTRIES[key])
        registry.functions = {target: list(functions) for target, functions in registry.functions.items()}
        return registry

    setattr(registry_class, "from_torchlib", classmethod(from_torchlib))  # setattr: mypy refuses assigning a method
    try:
        yield
    finally:
        setattr(registry_class, "from_torchlib", original)


def _tensors(proto: Any) -> Iterator[Any]:
    """Every TensorProto of a ModelProto: initializers (sparse ones too) and tensor attributes, in the graph, its
    subgraphs and the model's functions."""
    import onnx

    def sparse_parts(sparse: Any) -> Iterator[Any]:
        yield sparse.values
        yield sparse.indices

    def node_tensors(nodes: Any) -> Iterator[Any]:
        for node in nodes:
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.TENSOR:
                    yield attribute.t
                elif attribute.type == onnx.AttributeProto.TENSORS:
                    yield from attribute.tensors
                elif attribute.type == onnx.AttributeProto.SPARSE_TENSOR:
                    yield from sparse_parts(attribute.sparse_tensor)
                elif attribute.type == onnx.AttributeProto.SPARSE_TENSORS:
                    for sparse in attribute.sparse_tensors:
                        yield from sparse_parts(sparse)
                elif attribute.type == onnx.AttributeProto.GRAPH:
                    yield from graph_tensors(attribute.g)
                elif attribute.type == onnx.AttributeProto.GRAPHS:
                    for sub in attribute.graphs:
                        yield from graph_tensors(sub)

    def graph_tensors(graph: Any) -> Iterator[Any]:
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield from sparse_parts(sparse)
        yield from node_tensors(graph.node)

    yield from graph_tensors(proto.graph)
    for function in proto.functions:
        yield from node_tensors(function.node)


def external_data_locations(path: Path) -> list[str]:
    """The external-data file names a model refers to (without reading any of them)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    locations = []
    for tensor in _tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            entries = {entry.key: entry.value for entry in tensor.external_data}
            locations.append(entries.get("location", ""))
    return locations


def check_external_data(path: Path) -> list[str]:
    """Refuse a model whose external data lies outside its directory (absolute, ``..``, or a symlink out)."""
    root = path.parent.resolve()
    locations = external_data_locations(path)
    for location in locations:
        target = (root / location).resolve()
        if not location or os.path.isabs(location) or not target.is_relative_to(root):
            raise ArtifactError(
                f"{path.name} refers to external data {location!r} outside its directory {root}; refusing to load it"
            )
    return locations


def embedded_config(path: str | os.PathLike[str]) -> Optional[dict[str, Any]]:
    """The loss config recorded in the model's ``metadata_props`` (None if there is none, and for a model with
    losses attached (:func:`~visdet_export.export.attach.attach_losses`), which computes several:
    :func:`~visdet_export.export.attach.attached_losses` lists them)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    props = {prop.key: prop.value for prop in model.metadata_props}
    if ATTACHED_METADATA_KEY in props:
        return None
    raw = props.get(METADATA_PREFIX + "config")
    return None if raw is None else json.loads(raw)


def _attribute(node: Any, name: str, default: int) -> int:
    for attribute in node.attribute:
        if attribute.name == name:
            return int(attribute.i)
    return default


def accurate_total_sums(model: Any) -> int:
    """Rewrite every whole-tensor ``ReduceSum`` so that onnxruntime sums as accurately as eager PyTorch.

    onnxruntime's float32 ``ReduceSum`` over all elements accumulates with little precision: for focal-loss
    elements at N = 100000 x 80 (sum 2.02e6) it returns 2.020093e6 where the exact sum is 2021285.94 (relative
    error 5.9e-4, eager: 2e-8). Summing the last axis first (runs of C values) and the remaining N partial sums
    in float64 gives 2021285.9. A node ``ReduceSum(x)`` (all axes, ``keepdims=0``) of a rank-r input becomes
    r - 1 ``ReduceSum(axes=[-1])`` and a float64 ``ReduceSum`` of the rank-1 rest. Returns the number rewritten.
    """
    import onnx
    from onnx import TensorProto, helper

    inferred = onnx.shape_inference.infer_shapes(model)
    ranks: dict[str, int] = {}
    for info in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        tensor_type = info.type.tensor_type
        if tensor_type.HasField("shape") and tensor_type.elem_type == TensorProto.FLOAT:
            ranks[info.name] = len(tensor_type.shape.dim)
    axes_name = "visdet_export_last_axis"
    nodes = []
    rewritten = 0
    for node in model.graph.node:
        whole = (
            _op(node) == "ReduceSum"
            and (len(node.input) < 2 or node.input[1] == "")
            and _attribute(node, "keepdims", 1) == 0
            and _attribute(node, "noop_with_empty_axes", 0) == 0
            and node.input[0] in ranks
        )
        if not whole:
            nodes.append(node)
            continue
        rewritten += 1
        current, base = node.input[0], f"{node.output[0]}__visdet_sum"
        for stage in range(ranks[node.input[0]] - 1):
            staged = f"{base}_axis{stage}"
            nodes.append(helper.make_node("ReduceSum", [current, axes_name], [staged], keepdims=0, name=staged))
            current = staged
        nodes.append(helper.make_node("Cast", [current], [f"{base}_f64"], to=TensorProto.DOUBLE, name=f"{base}_f64"))
        nodes.append(
            helper.make_node("ReduceSum", [f"{base}_f64"], [f"{base}_total"], keepdims=0, name=f"{base}_total")
        )
        nodes.append(helper.make_node("Cast", [f"{base}_total"], [node.output[0]], to=TensorProto.FLOAT, name=base))
    if rewritten:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        if axes_name not in {init.name for init in model.graph.initializer}:
            model.graph.initializer.append(helper.make_tensor(axes_name, TensorProto.INT64, [1], [-1]))
    return rewritten


def _scalar_value(initializers: Mapping[str, Any], name: str) -> Optional[float]:
    from onnx import numpy_helper

    init = initializers.get(name)
    if init is None:
        return None
    value = numpy_helper.to_array(init)
    return float(value.reshape(-1)[0]) if value.size == 1 and value.dtype.kind == "f" else None


#: The domains of ONNX's own operators (a node of another domain is a custom operator, left alone).
DEFAULT_DOMAINS = ("", "ai.onnx")


def _op(node: Any) -> Optional[str]:
    """The operator of ``node`` where it is one of ONNX's own, else None."""
    return node.op_type if node.domain in DEFAULT_DOMAINS else None


class _GraphIndex:
    """A graph's initializers by name and the node that produces each value, as they were when indexed."""

    def __init__(self, graph: Any) -> None:
        self.initializers = {init.name: init for init in graph.initializer}
        self.producer = {output: node for node in graph.node for output in node.output}

    def made(self, name: str, op_type: str) -> Any:
        """The node that produces ``name`` where it is ONNX's ``op_type``, else None."""
        node = self.producer.get(name)
        return node if node is not None and _op(node) == op_type else None

    def scalar(self, name: str) -> Optional[float]:
        """The value of ``name`` where it is a one-element float initializer, else None."""
        return _scalar_value(self.initializers, name)


def branch_free_selects(model: Any) -> int:
    """Replace the sign selects of the stable sigmoid (``numerics.sigmoid_pair``) by branch-free operators.

    onnxruntime's CPU ``Where`` selects in three scalar, branching passes; with the sign of the logits as its
    condition (unpredictable) one ``Where`` over 100000 x 80 floats takes 53 ms, 20x an ``Abs`` (1 thread).
    Focal loss ran three of them (238 -> 89 ms for the graph). With ``x >= 0`` as the condition
    (``GreaterOrEqual(x, 0)``), ``e = Exp(Neg(|x|))`` and ``r = Reciprocal(Add(e, 1))``:

    - ``Where(x >= 0, x, Neg(x))`` -> ``Abs(x)``;
    - ``Where(x >= 0, r, Mul(e, r))`` -> ``Mul(Max(e, s), r)`` with the step ``s = Cast(x >= 0)``:
      ``e <= 1``, so the factor is 1 where x >= 0 and ``e`` where x < 0;
    - ``Where(x >= 0, Mul(e, r), r)`` -> ``Mul(Max(e, Sub(1, s)), r)``, the mirror image.

    Each gives the value the select gave (NaN stays NaN through ``r``; only the sign of a zero ``|x|`` may differ,
    which ``Exp(Neg(.))`` does not see). The factors reuse ``e``, and the step is the graph's own cast of the
    condition where it has one (the BCE's ``x ([x >= 0] - t)``), so a graph that needs both sigmoid(x) and
    sigmoid(-x) (focal, QFL's precise ``t - sigmoid(x)``) runs one ``Exp`` pass rather than three, and a pass
    fewer in all.

    Joint graphs hold the backward of those selects: autograd sends the upstream gradient ``v`` to one branch and 0
    to the other, a pair ``Where(x >= 0, v, 0)``, ``Where(x >= 0, 0, v)`` (five or six over (N, C) in focal's).
    The pair becomes ``k = Mul(v, s)`` and ``Sub(v, k)``: the selected values where ``v`` is finite (a zero's sign
    may differ); where it is not, the select already passes it on through one half and the other half's NaN
    joins it. A lone ``Where(x >= 0, v, 0)``, which could drop a NaN, is kept.

    Nodes left without consumers are dropped. Returns the number of selects rewritten.
    """
    from onnx import helper

    graph = model.graph
    graph_index = _GraphIndex(graph)
    made = graph_index.made

    def sign_test(condition: str) -> Optional[tuple[str, str]]:
        """``(x, zero)`` for a condition ``GreaterOrEqual(x, zero)``."""
        node = made(condition, "GreaterOrEqual")
        if node is None or graph_index.scalar(node.input[1]) != 0.0:
            return None
        return node.input[0], node.input[1]

    def magnitude_of(name: str) -> Optional[str]:
        """``x`` where ``name`` is ``|x|``, as ``Abs(x)`` or as ``Where(x >= 0, x, Neg(x))``."""
        if (absolute := made(name, "Abs")) is not None:
            return absolute.input[0]
        node = made(name, "Where")
        if node is None or (test := sign_test(node.input[0])) is None:
            return None
        negated = made(node.input[2], "Neg")
        x = test[0]
        return x if node.input[1] == x and negated is not None and negated.input[0] == x else None

    def sigmoid_of(r: str, er: str) -> Optional[tuple[str, str, str]]:
        """``(x, e, one)`` where ``r = 1 / (1 + e)`` and ``er = e * r`` with ``e = exp(-|x|)``."""
        reciprocal, product = made(r, "Reciprocal"), made(er, "Mul")
        if reciprocal is None or product is None or r not in product.input:
            return None
        e = product.input[1] if product.input[0] == r else product.input[0]
        total = made(reciprocal.input[0], "Add")
        if total is None or e not in total.input:
            return None
        one = total.input[1] if total.input[0] == e else total.input[0]
        exp = made(e, "Exp")
        negated = made(exp.input[0], "Neg") if exp is not None else None
        if graph_index.scalar(one) != 1.0 or negated is None:
            return None
        x = magnitude_of(negated.input[0])
        return None if x is None else (x, e, one)

    nodes = []
    casts = {
        (node.input[0], attribute.i): node
        for node in graph.node
        if _op(node) == "Cast"
        for attribute in node.attribute
        if attribute.name == "to"
    }
    placed: set[str] = set()
    rewritten = 0

    def step_of(condition: str, one: str) -> str:
        """``condition`` cast to the type of ``one`` (x's): the graph's own cast (the BCE's step) where it has one,
        moved up to its first use."""
        key = (condition, graph_index.initializers[one].data_type)
        cast = casts.get(key)
        if cast is None:
            step = f"{condition}__visdet_step"
            cast = casts[key] = helper.make_node("Cast", [condition], [step], to=key[1], name=step)
        if cast.output[0] not in placed:
            nodes.append(cast)
            placed.add(cast.output[0])
        return cast.output[0]

    def zero_side(node: Any) -> Optional[tuple[str, int]]:
        """``(v, side)`` for ``Where(x >= 0, v, 0)`` (side 1) or ``Where(x >= 0, 0, v)`` (side 2)."""
        for side, other in ((1, 2), (2, 1)):
            if graph_index.scalar(node.input[other]) == 0.0:
                return node.input[side], side
        return None

    # The backward of a sign select sends the upstream gradient v to one branch and 0 to the other.
    halves: dict[tuple[str, str], dict[int, Any]] = {}
    for node in graph.node:
        if _op(node) == "Where" and sign_test(node.input[0]) is not None:
            if (found := zero_side(node)) is not None:
                halves.setdefault((node.input[0], found[0]), {}).setdefault(found[1], node)
    split = {id(node): both for both in halves.values() if len(both) == 2 for node in both.values()}

    for node in graph.node:
        if node.output[0] in placed:
            continue
        test = sign_test(node.input[0]) if _op(node) == "Where" else None
        if test is None:
            nodes.append(node)
            placed.update(node.output)  # a cast step_of may reuse later stays where it is
            continue
        x, condition = test[0], node.input[0]
        out, on_true, on_false = node.output[0], node.input[1], node.input[2]
        factor = f"{out}__visdet_factor"
        if (both := split.get(id(node))) is not None:
            kept, dropped = both[1], both[2]
            gradient, zero = kept.input[1], kept.input[2]
            nodes += [
                helper.make_node("Mul", [gradient, step_of(condition, zero)], [kept.output[0]], name=kept.name),
                helper.make_node("Sub", [gradient, kept.output[0]], [dropped.output[0]], name=dropped.name),
            ]
            placed.update((kept.output[0], dropped.output[0]))
            rewritten += 1  # and the other half, skipped as placed
        elif magnitude_of(out) == x:
            nodes.append(helper.make_node("Abs", [x], [out], name=node.name))
        elif (sigmoid := sigmoid_of(on_true, on_false)) is not None and sigmoid[0] == x:
            _, e, one = sigmoid
            nodes += [
                helper.make_node("Max", [e, step_of(condition, one)], [factor], name=factor),
                helper.make_node("Mul", [factor, on_true], [out], name=node.name),
            ]
        elif (sigmoid := sigmoid_of(on_false, on_true)) is not None and sigmoid[0] == x:
            _, e, one = sigmoid
            complement = f"{out}__visdet_complement"
            nodes += [
                helper.make_node("Sub", [one, step_of(condition, one)], [complement], name=complement),
                helper.make_node("Max", [e, complement], [factor], name=factor),
                helper.make_node("Mul", [factor, on_false], [out], name=node.name),
            ]
        else:
            nodes.append(node)
            continue
        rewritten += 1
    if rewritten:
        del graph.node[:]
        graph.node.extend(nodes)
        _drop_unused_nodes(graph)
    return rewritten


def one_sided_clips(model: Any) -> int:
    """Write a ``Clip`` with one bound as ``Max(x, min)`` or ``Min(x, max)``, which keep infinities.

    ONNX fills a missing bound of ``Clip`` with the float type's extremes, so onnxruntime's ``clamp(min=0)`` of +inf
    is 3.4e38: a box with an infinite coordinate (a diverged regression head) got a finite GIoU loss in
    onnxruntime, NaN in every torch runtime. ``Max`` / ``Min`` give torch's ``clamp`` (NaN stays NaN) at the same
    cost (one memory pass, measured at 1M and 8M floats). Returns the number of ``Clip`` rewritten.
    """
    from onnx import helper

    rewritten = 0
    for index, node in enumerate(model.graph.node):
        if _op(node) != "Clip":
            continue
        bounds = [*node.input[1:], "", ""][:2]
        if bool(bounds[0]) == bool(bounds[1]):
            continue
        op_type, bound = ("Max", bounds[0]) if bounds[0] else ("Min", bounds[1])
        clamp = helper.make_node(op_type, [node.input[0], bound], list(node.output), name=node.name)
        model.graph.node[index].CopyFrom(clamp)
        rewritten += 1
    return rewritten


def compensated_log1p(model: Any) -> int:
    """Add the rounding error of ``u = Add(Exp(z), 1)`` back to ``Log(u)``: ``Log(u) + (e - (u - 1))`` for
    ``e = Exp(z)``, the exported ``log1p(exp(-|x|))`` of BCE, focal loss and QFL (``numerics.sigmoid_pair``).

    ONNX has no ``Log1p``: the exporter takes the logarithm of the float32 sum ``u = 1 + e``, which keeps about
    6e-8 / e of relative precision and is 0 from |x| ~ 16.6, where the term is still ~6e-8. Those are the
    confident predictions of a trained detector: measured over N = 20000 logits around -+16, sigmoid CE on labels
    came out 7.9e-3 (focal 1.7e-4) off in onnxruntime, 2e-8 eager. ``u - 1`` is exact (``u`` is in [1, 2]), so
    ``e - (u - 1)`` is the part of ``e`` the sum lost, and ``log(u - d) = log(u) - d / u`` to first order; the
    ``1 / u`` (in [1/2, 1]) is left out, where ``d`` is half an ulp of ``u``: within 1.2e-7 relative of float64
    on every ``z <= 0``. Three element-wise passes (~1.7x the three it corrects, measured); onnxruntime's
    ``Softplus``, as precise, took 3x. Returns the number of ``Log`` rewritten.
    """
    from onnx import helper

    graph = model.graph
    graph_index = _GraphIndex(graph)

    def one_plus_exp(name: str) -> Optional[tuple[str, str]]:
        """``(e, one)`` where ``name`` is ``Add(e, one)`` (either order) with ``e = Exp(.)`` and ``one`` 1."""
        total = graph_index.made(name, "Add")
        for position in (0, 1) if total is not None else ():
            one = total.input[1 - position]
            if graph_index.made(total.input[position], "Exp") is not None and graph_index.scalar(one) == 1.0:
                return total.input[position], one
        return None

    nodes = []
    rewritten = 0
    for node in graph.node:
        found = one_plus_exp(node.input[0]) if _op(node) == "Log" else None
        if found is None:
            nodes.append(node)
            continue
        (e, one), total, out = found, node.input[0], node.output[0]
        rounded, added, lost = (f"{out}__visdet_{part}" for part in ("rounded", "added", "lost"))
        nodes += [
            helper.make_node("Log", [total], [rounded], name=rounded),
            helper.make_node("Sub", [total, one], [added], name=added),
            helper.make_node("Sub", [e, added], [lost], name=lost),
            helper.make_node("Add", [rounded, lost], [out], name=node.name),
        ]
        rewritten += 1
    if rewritten:
        del graph.node[:]
        graph.node.extend(nodes)
    return rewritten


def _drop_unused_nodes(graph: Any) -> None:
    """Remove the nodes of ``graph`` none of whose outputs is used (by a node, a subgraph or a graph output)."""
    used = {output.name for output in graph.output} | _subgraph_inputs(graph)
    live = []
    for node in reversed(graph.node):  # topological order: consumers come after their producers
        if any(output in used for output in node.output):
            live.append(node)
            used.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(live))


#: Element-wise operators a masked tensor may flow through before its weight is applied (same positions in, out).
_ELEMENTWISE = frozenset({
    "Abs", "Neg", "Exp", "Log", "Reciprocal", "Sqrt", "Floor", "Ceil", "Sign", "Sigmoid", "Softplus", "Tanh", "Relu",
    "Erf", "Identity", "Add", "Sub", "Mul", "Div", "Pow", "Min", "Max", "Clip", "Where", "Equal", "Less", "Greater",
    "LessOrEqual", "GreaterOrEqual", "Not", "And", "Or", "IsNaN", "IsInf",
})
#: Reductions and row-local operators: allowed when they combine positions along axes the mask is constant on.
_REDUCTIONS = frozenset({"ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceLogSumExp"})
_ROW_LOCAL = frozenset({"LogSoftmax", "Softmax"})
#: Operators that move values along one axis, by indices (their second input) that must not be masked.
_ALONG_AXIS = frozenset({"GatherElements", "ScatterElements"})
#: Operators whose output is NaN wherever an input is NaN and which drop no position (IEEE arithmetic, sums).
_NAN_PROPAGATING = frozenset({
    "Add", "Sub", "Mul", "Div", "Neg", "Abs", "Exp", "Log", "Sqrt", "Reciprocal", "Identity", "Squeeze",
    "Unsqueeze", "Reshape", "ReduceSum", "ReduceMean",
})
# Nominal size of a dynamic dimension when weighing the selects removed against those added.
_NOMINAL_DYNAMIC = 1 << 20


class _MaskTrace(NamedTuple):
    """What :func:`_trace_weight_masks` found: the weight-0 selects that can go and where the weight is applied."""

    removed: list[Any]  # the selects, each ``Where`` with its value input at ``values[output]``
    values: dict[str, str]
    weighted: list[tuple[Any, int]]  # ``Mul(t, w)`` nodes and the position of ``t``
    size: Callable[[str], Optional[int]]
    types: dict[str, int]
    initializers: dict[str, Any]


def _trace_weight_masks(model: Any, *, watch: bool) -> _MaskTrace:
    """Find the weight-0 selects whose unmasked values would only reach multiplications by the weight.

    A select ``Where(keep, x, 0)`` (or ``Where(w == 0, 0, x)``) whose mask is ``w != 0`` (possibly and-ed with
    other conditions, up to Unsqueezes that append axes) is followed forward: its values may pass through
    element-wise operators (operands of the same rank: ONNX broadcasting aligns trailing axes, the mask leading
    ones), reductions / softmax / ``GatherElements`` / ``ScatterElements`` data along axes the mask is constant
    on, and (Un)squeezes of those axes, so a weight-0 position only ever feeds weight-0 positions. They end at an
    existing select on the same mask, or at ``Mul(t, w')`` with ``w'`` the weight (up to appended axes). With
    ``watch``, each such product must then reach the graph outputs through NaN-propagating operators only
    (arithmetic, sums, casts between floats, reshapes), so a NaN there shows in the outputs. A select whose values
    would reach anything else (an index, an integer cast, a reduction across the mask, another mask, a graph
    output, a subgraph) is kept, and the tracing repeats without it.
    """
    import onnx
    from onnx import TensorProto, numpy_helper

    graph = model.graph
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes: dict[str, list[Optional[int]]] = {}
    types: dict[str, int] = {}
    for info in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        tensor_type = info.type.tensor_type
        types[info.name] = tensor_type.elem_type
        if tensor_type.HasField("shape"):
            shapes[info.name] = [dim.dim_value if dim.HasField("dim_value") else None for dim in tensor_type.shape.dim]
    graph_index = _GraphIndex(graph)
    initializers, made = graph_index.initializers, graph_index.made
    for init in graph.initializer:
        shapes[init.name], types[init.name] = list(init.dims), init.data_type
    float_types = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}

    def rank(name: str) -> Optional[int]:
        shape = shapes.get(name)
        return None if shape is None else len(shape)

    def ints(name: str) -> Optional[list[int]]:
        init = initializers.get(name)
        return None if init is None else [int(v) for v in numpy_helper.to_array(init).reshape(-1)]

    def leading(name: str) -> str:
        """``name`` without the Unsqueezes that appended trailing axes to it (or Squeezes that removed them)."""
        while (node := made(name, "Unsqueeze") or made(name, "Squeeze")) is not None:
            axes, inner = ints(node.input[1]) if len(node.input) > 1 else None, rank(node.input[0])
            out = rank(node.output[0])
            if axes is None or inner is None or out is None:
                break
            low, high = (inner, out) if node.op_type == "Unsqueeze" else (out, inner)
            if sorted(a % high for a in axes) != list(range(low, high)):
                break
            name = node.input[0]
        return name

    def effective_rank(name: str) -> Optional[int]:
        """The rank of ``name`` without its trailing axes of static size 1 (those broadcast)."""
        shape = shapes.get(name)
        if shape is None:
            return None
        while shape and shape[-1] == 1:
            shape = shape[:-1]
        return len(shape)

    def zero_test(condition: str) -> Optional[str]:
        """``w`` for a condition ``Equal(w, 0)`` (up to appended axes of either)."""
        equal = made(leading(condition), "Equal")
        if equal is None:
            return None
        for value, zero in (equal.input, reversed(equal.input)):
            if graph_index.scalar(zero) == 0.0:
                return leading(value)
        return None

    def mask_of(condition: str) -> tuple[str, str]:
        """The mask a keep-condition stands for: ``("weight", w)`` for ``w != 0``, else the condition itself."""
        condition = leading(condition)
        negation = made(condition, "Not")
        weight = zero_test(negation.input[0]) if negation is not None else None
        return ("weight", weight) if weight is not None else ("condition", condition)

    def weight_mask(mask: tuple[str, str]) -> bool:
        """Whether ``mask`` is ``weight != 0``, or a conjunction of it with other conditions."""
        conjunction = made(mask[1], "And") if mask[0] == "condition" else None
        return mask[0] == "weight" or (
            conjunction is not None and any(weight_mask(mask_of(name)) for name in conjunction.input)
        )

    def input_select(node: Any) -> Optional[tuple[tuple[str, str], int]]:
        """The mask of a float select of 0 on the masked positions, and the position of its value input."""
        if _op(node) != "Where" or len(node.input) != 3:
            return None
        condition, on_true, on_false = node.input
        if graph_index.scalar(on_false) == 0.0:
            mask, index = mask_of(condition), 1
        elif graph_index.scalar(on_true) == 0.0 and (weight := zero_test(condition)) is not None:
            mask, index = ("weight", weight), 2
        else:
            return None
        values = node.input[index]
        mask_rank = effective_rank(mask[1])
        if types.get(values) not in float_types or rank(values) is None or rank(values) != rank(node.output[0]):
            return None
        return (mask, index) if mask_rank is not None and 0 < mask_rank <= rank(values) else None  # type: ignore

    def axes_of(node: Any, node_rank: int) -> Optional[list[int]]:
        if node.op_type in _ROW_LOCAL:
            return [_attribute(node, "axis", -1) % node_rank]
        if node.op_type in _ALONG_AXIS:
            return [_attribute(node, "axis", 0) % node_rank]
        if len(node.input) > 1 and node.input[1]:
            axes = ints(node.input[1])
            return None if axes is None else [a % node_rank for a in axes]
        return None  # all axes (or unknown)

    def size(name: str) -> Optional[int]:
        if name not in shapes:
            return None
        total = 1
        for dim in shapes[name]:
            total *= _NOMINAL_DYNAMIC if dim is None else dim
        return total

    subgraph_names = _subgraph_inputs(graph)
    outputs = {output.name for output in graph.output}
    kept: set[str] = set()  # selects that must stay (their unmasked values would reach something unsafe)
    while True:
        taint: dict[str, tuple[tuple[str, str], frozenset[str]]] = {}  # tensor -> (mask, selects it bypasses)
        watched: dict[str, frozenset[str]] = {}  # products by the weight -> the selects they bypass
        removed, values, weighted, failed = [], {}, [], None
        for node in graph.node:
            select = input_select(node)
            carried = [taint[name] for name in node.input if name in taint]
            seen = [watched[name] for name in node.input if name in watched]
            if select is not None and weight_mask(select[0]) and node.output[0] not in kept and not carried + seen:
                taint[node.output[0]] = (select[0], frozenset([node.output[0]]))
                removed.append(node)
                values[node.output[0]] = node.input[select[1]]
                continue
            sources = frozenset().union(*(entry[1] for entry in carried), *seen)
            op = _op(node)
            if seen:
                propagates = op in _NAN_PROPAGATING or (op == "Cast" and _attribute(node, "to", 0) in float_types)
                if carried or not propagates:
                    failed = sources
                    break
                watched.update((output, sources) for output in node.output)
                continue
            if not carried:
                continue
            masks = {entry[0] for entry in carried}
            if len(masks) > 1:
                failed = sources
                break
            (mask,) = masks
            mask_rank = effective_rank(mask[1])
            tainted = [name in taint for name in node.input]
            out_rank = rank(node.output[0])
            if select is not None and select[0] == mask and tainted == [index == select[1] for index in range(3)]:
                continue  # an existing select on the same mask: its output no longer depends on the removed ones
            if op == "Mul" and out_rank is not None and sum(tainted) == 1 and mask[0] == "weight":
                factor, value = node.input[1 - tainted.index(True)], node.input[tainted.index(True)]
                aligned = rank(factor) == out_rank == rank(value)
                if leading(factor) == mask[1] and aligned and types.get(value) in float_types:
                    weighted.append((node, tainted.index(True)))
                    if watch:
                        watched[node.output[0]] = sources
                    continue
            safe = False
            if out_rank is None or mask_rank is None:
                pass
            elif op in _ELEMENTWISE or op == "Cast":
                safe = all(rank(name) == out_rank for name in node.input if name in taint) and (
                    op != "Cast" or _attribute(node, "to", 0) in float_types | {TensorProto.BOOL}
                )
            elif op in _REDUCTIONS or op in _ROW_LOCAL or (op in _ALONG_AXIS and not tainted[1]):
                axes = axes_of(node, rank(node.input[0]) or 0)
                safe = axes is not None and len(axes) > 0 and min(axes) >= mask_rank and out_rank >= mask_rank
            elif op in ("Squeeze", "Unsqueeze") and tainted == [True, False][: len(tainted)]:
                axes = axes_of(node, max(rank(node.input[0]) or 0, out_rank))
                safe = axes is not None and len(axes) > 0 and min(axes) >= mask_rank
            if not safe:
                failed = sources
                break
            for output in node.output:
                taint[output] = (mask, sources)
        if failed is None:
            leaked = [entry[1] for name, entry in taint.items() if name in outputs or name in subgraph_names]
            leaked += [entry for name, entry in watched.items() if name in subgraph_names]
            failed = frozenset().union(*leaked) if leaked else None
        if failed is None:
            break
        kept |= failed
    return _MaskTrace(removed, values, weighted, size, types, initializers)


def late_weight_masks(model: Any) -> int:
    """Mask the weight-0 elements where the weight is applied instead of where the inputs enter.

    Losses zero the inputs of weight-0 elements with a select (``Where(weight != 0, x, 0)``, so NaN/inf there
    cannot reach the value), then multiply the element losses by the weight, often after a row reduction. A
    select over 100000 x 80 floats takes ~8 ms in onnxruntime (three passes), 3x the arithmetic around it;
    QFL masks two such inputs, IoU / GIoU eight box columns. This pass removes the input selects that
    :func:`_trace_weight_masks` clears and instead selects once on the operand of the multiplication by the
    weight, ``Mul(t, w)`` -> ``Mul(Where(w == 0, 0, t), w)``, where ``t`` is usually a row sum (N elements instead
    of N x C); an existing select on the same mask (softmax CE's ``Where(valid, -log p, 0)``) already does it.

    A weight-0 position only ever feeds weight-0 positions until then, and those are replaced by 0 before the
    multiplication: each weight-0 product is 0 (as before, where it was 0 x a finite value; the sign of such a
    zero may differ) and every other value is computed from the same operands as before. The rewrite is only
    made when it removes more selected elements than it adds (nominal N), so L1 / MSE (mask and weight of the
    same shape) are left alone; a per-sample weight of (N, C) losses multiplies their row sums
    (``reduction.weight_reduce_loss``), where one select of N values replaces one of N x C. Returns the number of
    input selects removed.
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    trace = _trace_weight_masks(model, watch=False)
    added = [trace.size(node.input[index]) for node, index in trace.weighted]
    saved = sum(trace.size(node.output[0]) or 0 for node in trace.removed)
    if not trace.removed or None in added or sum(added) >= saved:  # type: ignore[arg-type]
        return 0
    dropped = {id(node) for node in trace.removed}
    inserts = {id(node): index for node, index in trace.weighted}
    zeros: dict[int, str] = {}
    tests: dict[str, str] = {}
    selected: dict[tuple[str, str], str] = {}  # one select per operand and weight, however many products use it
    nodes = []
    for node in graph.node:
        if id(node) in dropped:
            continue
        for position, name in enumerate(node.input):
            if name in trace.values:
                node.input[position] = trace.values[name]
        if id(node) in inserts:
            index = inserts[id(node)]
            value, factor = node.input[index], node.input[1 - index]
            dtype = trace.types[value]
            if dtype not in zeros:
                zeros[dtype] = f"visdet_export_zero_{TensorProto.DataType.Name(dtype).lower()}"
                if zeros[dtype] not in trace.initializers:
                    zero = numpy_helper.from_array(np.zeros((), helper.tensor_dtype_to_np_dtype(dtype)), zeros[dtype])
                    graph.initializer.append(zero)
            if factor not in tests:
                tests[factor] = f"{factor}__visdet_is_zero"
                nodes.append(helper.make_node("Equal", [factor, zeros[dtype]], [tests[factor]], name=tests[factor]))
            if (value, factor) not in selected:
                masked = f"{value}__visdet_weighted" + (f"_{len(selected)}" if selected else "")
                nodes.append(helper.make_node("Where", [tests[factor], zeros[dtype], value], [masked], name=masked))
                selected[value, factor] = masked
            node.input[index] = selected[value, factor]
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_unused_nodes(graph)
    return len(trace.removed)


#: Relative onnxruntime CPU cost per element of the operators that cost more than an ``Add`` (1), measured at
#: 1-8M floats, 1 thread: a select ~2.5 ns/element against ~0.4; reshapes cost nothing.
_OP_COST = {
    "Where": 6.0, "LogSoftmax": 6.0, "Softmax": 6.0, "Pow": 6.0, "Softplus": 6.0, "Log": 4.0, "GatherElements": 4.0,
    "Exp": 3.0, "Sigmoid": 3.0, "Tanh": 3.0, "Erf": 3.0,
    "Identity": 0.0, "Reshape": 0.0, "Squeeze": 0.0, "Unsqueeze": 0.0, "Shape": 0.0, "Constant": 0.0,
}
#: ``unmasked_while_finite`` is applied when the unmasked nodes cost at most this share of the graph: it trades a
#: saving on finite inputs for the masked graph's extra run on inputs with NaN / inf at weight 0.
_UNMASKED_MAX_COST = 0.8


def _estimated_cost(nodes: Iterable[Any], size: Callable[[str], Optional[int]]) -> float:
    """The onnxruntime CPU time of ``nodes``, in ``Add`` elements (the largest operand or result of each)."""
    total = 0.0
    for node in nodes:
        sizes = [size(name) for name in [*node.input, *node.output] if name]
        elements = max((_NOMINAL_DYNAMIC if value is None else value for value in sizes), default=0)
        total += _OP_COST.get(node.op_type, 1.0) * elements
    return total


def unmasked_while_finite(model: Any) -> int:
    """Run the loss without its weight-0 selects, and the masked graph only when a result is not finite.

    An exact select costs a ``Where`` (~2.5 ns per element in onnxruntime against ~0.4 for an ``Add``); L1, MSE,
    smooth L1 and balanced L1 mask and weigh element-wise, so :func:`late_weight_masks` cannot shrink their
    select, and it is half their onnxruntime time. Without the selects every weight-0 element becomes
    ``f(x) * 0``: 0 as before (the sign of a zero may differ) when ``f(x)`` is finite, NaN otherwise, and
    :func:`_trace_weight_masks` (with ``watch``) proves that such a NaN reaches the outputs (sums, arithmetic,
    casts only). So when every output is finite (checked on its sum), the unmasked outputs equal the masked
    ones; when one is not, an ``If`` runs the masked graph (the original nodes, renamed) instead. Inputs with
    NaN / inf at weight-0 elements therefore cost the unmasked pass plus the masked graph. The unmasked pass also
    skips the BCE's selects of an exactly right infinite logit (:func:`_zero_factor_guards`), which only matter
    where a logit is infinite. Graphs with subgraphs or non-float outputs are left alone. Returns the number of
    selects the unmasked pass skips.
    """
    import copy

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    if any(attribute.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for node in graph.node
           for attribute in node.attribute):
        return 0
    trace = _trace_weight_masks(model, watch=True)
    results = list(graph.output)
    produced = {output for node in graph.node for output in node.output if output}
    guards = _zero_factor_guards(graph, trace)
    if not (trace.removed or guards) or any(
        trace.types.get(out.name) not in (TensorProto.FLOAT, TensorProto.DOUBLE) or out.name not in produced
        for out in results
    ):
        return 0
    skipped = trace.removed + [node for node in graph.node if node.output[0] in guards]
    dropped = {id(node) for node in skipped}
    values = {**trace.values, **guards}
    used = {out.name for out in results}
    unmasked_nodes = []
    for node in reversed(graph.node):
        if id(node) not in dropped and any(output in used for output in node.output):
            unmasked_nodes.append(node)
            used.update(values.get(name, name) for name in node.input)
    if _estimated_cost(unmasked_nodes, trace.size) > _UNMASKED_MAX_COST * _estimated_cost(graph.node, trace.size):
        return 0
    # The masked branch reads outer values only as node outputs: its own copies of the constants it reads, and
    # the graph inputs through Identity nodes of the outer graph (onnxruntime drops them). onnx.compose, which
    # attach uses, renames neither the outer initializers nor the graph inputs that a subgraph reads.
    constants = sorted({name for node in graph.node for name in node.input if name in trace.initializers})
    inputs = [value.name for value in graph.input if any(value.name in node.input for node in graph.node)]

    def masked_name(name: str) -> str:
        return f"{name}__visdet_masked" if name in produced or name in constants or name in inputs else name

    masked_nodes = []
    for node in graph.node:
        twin = copy.deepcopy(node)
        twin.input[:] = [masked_name(name) for name in node.input]
        twin.output[:] = [masked_name(name) for name in node.output]
        twin.name = masked_name(node.name) if node.name else ""
        masked_nodes.append(twin)

    def typed(name: str, like: Any) -> Any:
        return helper.make_tensor_value_info(name, like.type.tensor_type.elem_type, None)

    masked_constants = []
    for name in constants:
        constant = copy.deepcopy(trace.initializers[name])
        constant.name = masked_name(name)
        masked_constants.append(constant)
    masked_branch = helper.make_graph(
        masked_nodes, "masked", [], [typed(masked_name(out.name), out) for out in results], masked_constants
    )
    unmasked = {out.name: f"{out.name}__visdet_unmasked" for out in results}
    unmasked_branch = helper.make_graph(
        [helper.make_node("Identity", [unmasked[out.name]], [f"{out.name}__visdet_then"]) for out in results],
        "unmasked", [], [typed(f"{out.name}__visdet_then", out) for out in results],
    )
    nodes = [helper.make_node("Identity", [name], [masked_name(name)], name=masked_name(name)) for name in inputs]
    for node in graph.node:
        if id(node) in dropped:
            continue
        node.input[:] = [unmasked.get(name, name) for name in (values.get(name, name) for name in node.input)]
        node.output[:] = [unmasked.get(name, name) for name in node.output]
        nodes.append(node)
    checks = []
    for out in results:
        dtype = trace.types[out.name]
        zero = f"visdet_export_zero_{TensorProto.DataType.Name(dtype).lower()}"
        if zero not in trace.initializers and zero not in {init.name for init in graph.initializer}:
            graph.initializer.append(
                numpy_helper.from_array(np.zeros((), helper.tensor_dtype_to_np_dtype(dtype)), zero)
            )
        base = f"{out.name}__visdet_finite"
        nodes += [
            helper.make_node("ReduceSum", [unmasked[out.name]], [f"{base}_sum"], keepdims=0, name=f"{base}_sum"),
            helper.make_node("Sub", [f"{base}_sum", f"{base}_sum"], [f"{base}_zero"], name=f"{base}_zero"),
            helper.make_node("Equal", [f"{base}_zero", zero], [base], name=base),  # inf - inf and NaN are not 0
        ]
        checks.append(base)
    while len(checks) > 1:
        both = f"{checks[0]}_and_{len(checks)}"
        nodes.append(helper.make_node("And", checks[:2], [both], name=both))
        checks = [both, *checks[2:]]
    nodes.append(helper.make_node(
        "If", [checks[0]], [out.name for out in results], name="visdet_unmasked_while_finite",
        then_branch=unmasked_branch, else_branch=masked_branch,
    ))
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_unused_nodes(graph)
    return len(skipped)


def _zero_factor_guards(graph: Any, trace: _MaskTrace) -> dict[str, str]:
    """``{select: product}`` for the selects ``Where(b == 0, 0, Mul(a, b))`` that :func:`unmasked_while_finite` can
    skip: the exported BCE's 0 at an exactly right infinite logit (``numerics.linear_bce_term``, ``weighted_side``).
    Such a select differs from its product only where ``a`` is inf or NaN (``inf * 0`` is NaN), so it can go when
    every use of its values, however far, is a NaN-propagating operator (a NaN there then shows in the outputs,
    which the unmasked pass checks) or a select's value input (which drops a NaN where it would drop a 0). The
    weight-0 selects the trace removes are bypassed. Returns none of them if one value reaches anything else."""
    graph_index = _GraphIndex(graph)
    guards: dict[str, str] = {}
    for node in graph.node:
        if _op(node) != "Where" or len(node.input) != 3:
            continue
        test, product = graph_index.made(node.input[0], "Equal"), graph_index.made(node.input[2], "Mul")
        if _scalar_value(trace.initializers, node.input[1]) != 0.0 or test is None or product is None:
            continue
        for factor, zero in (test.input, reversed(test.input)):
            if _scalar_value(trace.initializers, zero) == 0.0 and factor in product.input:
                guards[node.output[0]] = node.input[2]
    removed = {id(node) for node in trace.removed}
    floats = {1, 10, 11, 16}  # FLOAT, FLOAT16, DOUBLE, BFLOAT16
    tainted = set(guards)
    for node in graph.node:
        if id(node) in removed or node.output[0] in guards:
            continue
        reads = [position for position, name in enumerate(node.input) if trace.values.get(name, name) in tainted]
        if not reads:
            continue
        op = _op(node)
        cast_to_float = op == "Cast" and _attribute(node, "to", 0) in floats
        if not (op in _NAN_PROPAGATING or cast_to_float or (op == "Where" and 0 not in reads)):
            return {}
        tainted.update(node.output)
    if tainted & _subgraph_inputs(graph):
        return {}
    return guards


def nonnegative_reduce_axes(model: Any) -> int:
    """Write the constant axes of every ``Reduce*`` node non-negative (``[-1]`` of a rank-2 input becomes ``[1]``).

    onnxruntime before 1.32 returns a reduction over a negative axis of an empty tensor unreduced ((0, C) stays
    (0, C)), so graphs with ``sum(-1)`` failed at N = 0 there; the graphs are deployed in runtimes older than the
    one that verified them. Returns the number of nodes rewritten."""
    import onnx
    from onnx import numpy_helper

    inferred = onnx.shape_inference.infer_shapes(model)
    ranks = {
        info.name: len(info.type.tensor_type.shape.dim)
        for info in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]
        if info.type.tensor_type.HasField("shape")
    }
    constants = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and [attribute.name for attribute in node.attribute] == ["value"]:
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    rewritten = 0
    for node in model.graph.node:
        if not ((_op(node) or "").startswith("Reduce") and len(node.input) > 1):
            continue
        axes, rank = constants.get(node.input[1]), ranks.get(node.input[0])
        if axes is None or rank is None or not (axes < 0).any():
            continue
        name = f"{node.input[1]}__visdet_rank{rank}"
        if name not in constants:
            constants[name] = (axes % rank).astype(np.int64)
            model.graph.initializer.append(numpy_helper.from_array(constants[name], name))
        node.input[1] = name
        rewritten += 1
    return rewritten


def checked_input_shapes(model: Any, least_sizes: Optional[Mapping[str, int]] = None) -> int:
    """Make onnxruntime refuse inputs whose shapes disagree where the graph's symbolic shapes tie them together.

    onnxruntime only logs a warning when an input's shape differs from the declared one, and the graphs do not
    look at most of the sizes they are fed: a target of fewer rows than ``pred`` made softmax CE and DFL gather
    the first rows, regression targets of one column broadcast, a ``(2,)`` ``avg_factor`` made the loss ``(2,)``,
    each a number without an error. Every 0-d input is reshaped to ``[]`` (one element, or onnxruntime's Reshape
    error), and every input axis whose symbol (``N``, ``C``, ...) an earlier input's axis has is checked equal to
    it: the difference of the two sizes, doubled, indexes a one-element tensor, which fails unless it is 0. The
    checks' zeros are added to each input's shape, which reshapes the input to itself before the loss reads it: no
    element is copied or changed, and each check costs a few operations on one integer whatever N. The reshaped
    value is declared with the input's shape (:func:`_same_type_as`), which shape inference cannot tell. The first axis
    of each symbol in ``least_sizes`` is also checked against its least size (the spec's
    :attr:`~visdet_export.specs.LossSpec.least_sizes`, what eager refuses: no classes where labels index them,
    fewer than two DFL bins), where a gather out of range named no input. onnxruntime 1.18's ``ShapeInputMerge``
    takes inputs declared alike to have equal sizes and folds the ties away (fixed in 1.19; pyproject asks for 1.20).
    Returns the number of checks written."""
    from onnx import helper, numpy_helper

    graph = model.graph
    least_sizes = least_sizes or {}
    checks = 0
    first: dict[str, tuple[str, int]] = {}
    ties: list[tuple[str, int, str, int, str]] = []
    bounds: list[tuple[str, int, str, int]] = []
    for info in graph.input:
        dims = info.type.tensor_type.shape.dim
        if info.type.tensor_type.HasField("shape") and len(dims) == 0:
            _reshape_to_scalar(graph, info.name)
            checks += 1
        for axis, dim in enumerate(dims):
            if dim.dim_param in first:
                ties.append((info.name, axis, *first[dim.dim_param], dim.dim_param))
            elif dim.dim_param:
                first[dim.dim_param] = (info.name, axis)
                if least_sizes.get(dim.dim_param, 0) > 0:
                    bounds.append((info.name, axis, dim.dim_param, least_sizes[dim.dim_param]))
    if not ties and not bounds:
        return checks
    single, two, zero = "visdet_check_single_zero", "visdet_check_two", "visdet_check_zero"
    graph.initializer.extend([
        numpy_helper.from_array(np.zeros(1, np.int64), single), numpy_helper.from_array(np.array(2, np.int64), two),
        numpy_helper.from_array(np.array(0, np.int64), zero),
    ])
    checking: list[Any] = []
    sizes: set[str] = set()

    def size(name: str, axis: int) -> str:
        out = f"{name}__visdet_size{axis}"
        if out not in sizes:
            sizes.add(out)
            checking.append(helper.make_node("Shape", [name], [out], start=axis, end=axis + 1))
        return out

    zeros = []
    for name, axis, tied_name, tied_axis, symbol in ties:
        stem = f"{name}__visdet_tie{axis}"
        # onnxruntime's error names the failing node: the name says what the inputs got wrong
        check = f"input check: {name}.shape[{axis}] must equal {tied_name}.shape[{tied_axis}] ({symbol})"
        checking.append(helper.make_node("Sub", [size(name, axis), size(tied_name, tied_axis)], [stem + "_diff"]))
        checking.append(helper.make_node("Mul", [stem + "_diff", two], [stem + "_index"]))  # -1 would index too
        checking.append(helper.make_node("Gather", [single, stem + "_index"], [stem], name=check, axis=0))
        zeros.append(stem)
    for name, axis, symbol, least in bounds:
        stem = f"{name}__visdet_least{axis}"
        check = f"input check: {name}.shape[{axis}] must be at least {least} ({symbol})"
        least_name = stem + "_value"
        graph.initializer.append(numpy_helper.from_array(np.array(least, np.int64), least_name))
        checking.append(helper.make_node("Sub", [size(name, axis), least_name], [stem + "_excess"]))
        checking.append(helper.make_node("Min", [stem + "_excess", zero], [stem + "_shortfall"]))
        checking.append(helper.make_node("Mul", [stem + "_shortfall", two], [stem + "_index"]))
        checking.append(helper.make_node("Gather", [single, stem + "_index"], [stem], name=check, axis=0))
        zeros.append(stem)
    total = zeros[0]
    for index, check_zero in enumerate(zeros[1:]):  # Sum takes floats only
        checking.append(helper.make_node("Add", [total, check_zero], [f"visdet_shape_checks_{index}"]))
        total = f"visdet_shape_checks_{index}"
    # every input with axes is read through a reshape to its own shape plus the checks' zeros: onnxruntime runs no
    # node of the loss before the checks (a wrong size is named by its check, not by the gather it breaks), and
    # the reshape copies nothing
    loss_nodes = list(graph.node)
    for info in graph.input:
        if len(info.type.tensor_type.shape.dim) == 0:
            continue
        checked, shape = f"{info.name}__visdet_checked", f"{info.name}__visdet_checked_shape"
        for node in loss_nodes:
            node.input[:] = [checked if value == info.name else value for value in node.input]
        checking.append(helper.make_node("Shape", [info.name], [shape + "_unchecked"]))
        checking.append(helper.make_node("Add", [shape + "_unchecked", total], [shape]))
        checking.append(helper.make_node("Reshape", [info.name, shape], [checked], allowzero=1))
        graph.value_info.append(_same_type_as(info, checked))
    del graph.node[:]
    graph.node.extend([*checking, *loss_nodes])
    return checks + len(ties) + len(bounds)


def _same_type_as(info: Any, name: str) -> Any:
    """A ``value_info`` entry declaring ``name`` of ``info``'s element type and shape.

    The checked reshape's output has its input's shape, but shape inference cannot tell from a computed shape:
    without the declaration onnxruntime sees a rank-2 tensor of unknown sizes and skips the rewrites that need
    them (the IoU graphs' four column ``Slice`` of each box input stay four strided copies instead of one
    ``Split``: IoU forward at 1M boxes, 1 thread, 50 against 28 ms)."""
    declared = type(info)()
    declared.CopyFrom(info)
    declared.name = name
    declared.doc_string = ""
    return declared


def _reshape_to_scalar(graph: Any, name: str) -> None:
    """Read graph input ``name`` through ``Reshape(name, [])`` (the first node), wherever it is read."""
    from onnx import helper, numpy_helper

    scalar, shape = f"{name}__visdet_scalar", f"{name}__visdet_scalar_shape"
    for node in graph.node:
        node.input[:] = [scalar if value == name else value for value in node.input]
    graph.initializer.append(numpy_helper.from_array(np.zeros(0, np.int64), shape))
    check = f"input check: {name} must be 0-d (or hold one element)"
    graph.node.insert(0, helper.make_node("Reshape", [name, shape], [scalar], name=check))


def describe_graph(model: Any, inputs: Sequence[Mapping[str, Any]], pred: str) -> None:
    """Each graph input's and output's ``doc_string``: what the manifest says of it, for a consumer holding only
    the ``.onnx`` file (labels' range, what ``avg_factor`` gives a plain mean, the gradient's meaning)."""
    docs = {entry["name"]: entry["doc"] for entry in inputs}
    docs["loss"] = "the loss: 0-d for reduction 'mean' or 'sum', per element for 'none'"
    docs[f"grad_{pred}"] = f"the gradient of the loss's sum with respect to {pred}, {pred}'s shape"
    for value in (*model.graph.input, *model.graph.output):
        if docs.get(value.name):
            value.doc_string = docs[value.name]


def drop_unused_initializers(model: Any) -> int:
    """Remove the initializers nothing reads (the exporter's and the rewrites' leftovers), for which onnxruntime
    prints a warning at every session it opens. Returns how many went."""
    graph = model.graph
    used = {name for node in graph.node for name in node.input} | _subgraph_inputs(graph)
    used |= {output.name for output in graph.output}
    unused = [init for init in graph.initializer if init.name not in used]
    for init in unused:
        graph.initializer.remove(init)
    return len(unused)


def _subgraph_inputs(graph: Any) -> set[str]:
    """Names read inside the subgraphs (If / Loop / Scan bodies) of ``graph``'s nodes, which may be outer values."""
    import onnx

    names: set[str] = set()
    for node in graph.node:
        for attribute in node.attribute:
            bodies = [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs)
            for body in bodies:
                names.update(name for inner in body.node for name in inner.input)
                names.update(_subgraph_inputs(body))
    return names


def _to_numpy(tensor: Tensor) -> np.ndarray:
    return tensor.detach().to("cpu").contiguous().numpy()


def load_runner(
    path: str | os.PathLike[str], manifest: Optional[Mapping[str, Any]] = None, *, threads: Optional[int] = None
) -> Any:
    """An onnxruntime (CPUExecutionProvider) runner for the model at ``path``.

    The runner takes named tensors (inputs the graph does not have are ignored) and returns the outputs as
    tensors, in graph order. Models with external data outside their directory are refused. ``threads``: the
    session's intra-op threads (default onnxruntime's, about one per core for each live runner: a service holding
    many runners sets 1).
    """
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path} is not a file")
    check_external_data(path)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    if threads is not None:
        options.intra_op_num_threads = options.inter_op_num_threads = int(threads)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    graph_inputs = [node.name for node in session.get_inputs()]
    if manifest is not None:
        expected = [entry["name"] for entry in manifest.get("inputs", [])]
        if expected and expected != graph_inputs:
            raise ArtifactError(f"{path.name} takes inputs {graph_inputs}, its manifest says {expected}")

    def run(inputs: Mapping[str, Tensor]) -> list[Tensor]:
        missing = [name for name in graph_inputs if name not in inputs]
        if missing:
            raise ArtifactError(f"missing input(s) {missing} for {path.name} (inputs: {graph_inputs})")
        outputs = session.run(None, {name: _to_numpy(inputs[name]) for name in graph_inputs})
        return [torch.from_numpy(np.asarray(output)) for output in outputs]

    run.input_names = graph_inputs  # type: ignore[attr-defined]
    run.output_names = [node.name for node in session.get_outputs()]  # type: ignore[attr-defined]
    return run


@one_export_at_a_time(*ONNX_EXPORTER_MODULES)
def export_onnx(
    loss_or_cfg: LossOrConfig,
    path: str | os.PathLike[str],
    *,
    variant: Optional[str] = None,
    optional_inputs: Sequence[str] = DEFAULT_OPTIONAL_INPUTS,
    opset: int = 18,
    joint: bool = False,
    verify: bool = True,
    overwrite: bool = False,
) -> Path:
    """Export a loss to an ONNX model at ``path`` and write its manifest ``<path>.json``.

    Args:
        loss_or_cfg: a built loss module, or a config (``dict(type="FocalLoss", gamma=2.0)``).
        path: the ``.onnx`` file to write; its directory must exist.
        variant: the input layout where a loss has several (``spec_for``), e.g. "onehot" for FocalLoss.
        optional_inputs: optional inputs that become graph inputs (default ``weight`` and ``avg_factor``; those
            a loss does not take are skipped, and ``avg_factor`` is dropped for ``reduction="sum"``, which
            rejects it, and ``"none"``, which ignores it).
        opset: ONNX opset, at least 18.
        joint: also output ``grad_pred``, the gradient of ``loss.sum()`` with respect to ``pred``.
        verify: compare with eager in onnxruntime at N = 0, 1, 7 and 1024 (capped for large samples) before
            the file is put in place; the parity reached goes into the manifest.
        overwrite: replace an existing file (and manifest).

    Returns:
        The path written.

    Raises:
        ArtifactError: the path exists (without ``overwrite``), is a directory or a symlink; the export (an opset
            torch's exporter does not write included), the checker or the parity check failed. Nothing is left
            behind on failure.
        ValueError: an opset below 18, an unknown variant or optional input.
    """
    import onnx

    if int(opset) < MIN_OPSET:
        raise ValueError(f"opset {opset} is not supported; use opset >= {MIN_OPSET}")
    plan = ExportPlan.prepare(
        loss_or_cfg, path, variant=variant, optional_inputs=optional_inputs, joint=joint, overwrite=overwrite
    )
    loss, config, spec, names = plan.loss, plan.config, plan.spec, plan.names
    outputs, target = plan.outputs, plan.target

    example = example_inputs(loss, spec, names)
    with quiet_exporter(), torchlib_registry_built_once():
        try:
            module = joint_module(loss, spec, names, example=example) if joint else spec.bind(loss, names)
            with evaluation_mode(module):
                program = torch.onnx.export(
                    module,
                    example,
                    dynamo=True,
                    dynamic_shapes=dynamic_shapes(spec, names),
                    input_names=names,
                    output_names=outputs,
                    opset_version=int(opset),
                    external_data=False,
                    optimize=True,
                    verbose=False,
                    report=False,
                )
        except Exception as exc:  # the exporter raises many types; say which loss and why
            raise_hidden_interrupt(exc)
            raise ArtifactError(f"ONNX export of {spec.loss_type} ({spec.variant}) failed: {first_line(exc)}") from exc
    if program is None:  # pragma: no cover - only with f=..., which we never pass
        raise ArtifactError("torch.onnx.export returned no program")
    metadata = {
        "config": json.dumps(config, sort_keys=True),
        "loss_type": spec.loss_type,
        "variant": spec.variant,
        "inputs": json.dumps(names),
        "outputs": json.dumps(outputs),
        "joint": json.dumps(joint),
    }

    parity: Optional[dict[str, Any]] = None
    tolerance = TOLERANCES["onnx"]
    with atomic_output(target, overwrite) as tmp:
        siblings = set(tmp.parent.iterdir())
        with quiet_exporter():
            program.save(tmp, external_data=False)
        extra = [p for p in set(tmp.parent.iterdir()) - siblings if p != tmp]
        if extra:  # a > 2 GB model would spill its weights to a side file named after the temporary path
            for leftover in extra:
                leftover.unlink(missing_ok=True)
            raise ArtifactError(f"the ONNX model of {spec.loss_type} needs external data; not supported")
        if external_data_locations(tmp):
            raise ArtifactError(f"the ONNX model of {spec.loss_type} refers to external data; not supported")
        model = onnx.load(str(tmp))
        written = next((entry.version for entry in model.opset_import if entry.domain in DEFAULT_DOMAINS), None)
        if written != int(opset):  # torch's exporter falls back to its default for an opset it does not know
            raise ArtifactError(f"opset {opset} is not supported by torch's ONNX exporter (it wrote opset {written})")
        one_sided_clips(model)
        branch_free_selects(model)
        compensated_log1p(model)
        late_weight_masks(model)
        accurate_total_sums(model)
        unmasked_while_finite(model)
        nonnegative_reduce_axes(model)
        checked_input_shapes(model, spec.least_sizes)
        drop_unused_initializers(model)
        describe_graph(model, describe_inputs(spec, names, torch.float32, fixed_graph=True), spec.pred)
        for key, value in metadata.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = METADATA_PREFIX + key, value
        model.doc_string = f"visdet_export {spec.loss_type} loss ({spec.variant}): {metadata['config']}"
        onnx.save_model(model, str(tmp))
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except Exception as exc:
            raise ArtifactError(f"onnx.checker rejected the {spec.loss_type} model: {exc}") from exc
        if verify:
            runner = load_runner(tmp)
            sizes = spec.capped_sizes(EXPORT_PARITY_SIZES)
            parity = check_parity(runner, loss, spec, names, joint=joint, sizes=sizes, seed=0, **tolerance)
    fields = plan.manifest_fields("onnx", parity, opset=int(opset), dynamic_dims=dynamic_dims(spec, names))
    write_manifest(target, fields, overwrite=True)
    return target


__all__ = ["EXPORT_PARITY_SIZES", "embedded_config", "export_onnx", "load_runner", "quiet_exporter"]
