"""Format-neutral tracing helpers, and the joint loss + gradient graph for runtimes without autograd.

Every exporter (ONNX, ``.pt2``) traces a loss through ``torch.export`` with the same calling convention: a module
whose ``forward(*tensors)`` takes the spec's inputs positionally in the order given by ``names``, one dynamic sample
count ``N`` (``torch.export.Dim``, min 0) shared by every N-sized input, and every other size fixed by the
configuration. :func:`select_inputs`, :func:`example_inputs` and :func:`dynamic_shapes` give those three pieces.

:func:`joint_module` builds a module returning ``(loss, d loss.sum() / d pred)``. ``torch.autograd.grad`` inside a
``forward`` does not survive ``torch.export``, so the forward and backward are first traced together into one
aten-level graph with ``make_fx(..., tracing_mode="symbolic")`` (sizes stay symbolic, so nothing depends on the
example's N), and that graph is what the exporters then export like any other module.

>>> from visdet_export import build_loss
>>> from visdet_export.specs import spec_for
>>> loss = build_loss(dict(type="L1Loss"))
>>> spec = spec_for(loss)
>>> names = select_inputs(spec)
>>> value, grad = joint_module(loss, spec, names)(*example_inputs(loss, spec, names, n=3))
>>> tuple(grad.shape)
(3, 4)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..specs import LossSpec, SampleOptions

#: The sample count exporters trace with. Not 0 or 1, which torch.export would specialise on.
EXAMPLE_N = 7
#: Optional inputs a graph takes by default: per-sample weights and the mean's denominator.
DEFAULT_OPTIONAL_INPUTS = ("weight", "avg_factor")


def select_inputs(spec: LossSpec, optional_inputs: Sequence[str] = DEFAULT_OPTIONAL_INPUTS) -> list[str]:
    """The graph's input names, in spec order: every required input plus the requested optional ones.

    Requested optional inputs that this spec does not have are skipped when they are among the defaults
    (mask cross-entropy has no ``weight``); any other unknown name raises :class:`ValueError`.
    """
    if isinstance(optional_inputs, str):
        raise TypeError("optional_inputs must be a sequence of input names, not a string")
    optional = [t.name for t in spec.inputs if t.optional]
    unknown = sorted(set(optional_inputs) - set(spec.names) - set(DEFAULT_OPTIONAL_INPUTS))
    if unknown:
        raise ValueError(
            f"{spec.loss_type} has no optional input(s) {', '.join(unknown)}; "
            f"its optional inputs are: {', '.join(optional) or 'none'}"
        )
    requested = set(optional_inputs)
    return [t.name for t in spec.inputs if not t.optional or t.name in requested]


def example_inputs(
    loss: nn.Module,
    spec: LossSpec,
    names: Sequence[str],
    *,
    n: int = EXAMPLE_N,
    seed: int = 0,
    options: SampleOptions = SampleOptions(),
) -> tuple[Tensor, ...]:
    """Valid random inputs for ``n`` samples, positionally in the order of ``names``."""
    drawn = spec.sample(loss, n, seed=seed, options=options, include=list(names))
    return tuple(drawn[name] for name in names)


def dynamic_dims(spec: LossSpec, names: Sequence[str]) -> dict[str, dict[str, int]]:
    """The manifest's record of the dynamic axes: ``{symbol: {"min": m}}`` for every symbol of the named inputs'
    shapes (N from 0, free sizes such as the class count C from 1, DFL's bins from 2:
    :meth:`~visdet_export.specs.LossSpec.smallest_size`)."""
    return {symbol: {"min": spec.smallest_size(symbol)} for symbol in spec.symbols(names)}


def dynamic_shapes(
    spec: LossSpec, names: Sequence[str], dim_names: Optional[Mapping[str, str]] = None
) -> tuple[tuple[dict[int, Any], ...]]:
    """``dynamic_shapes`` for ``torch.export`` / ``torch.onnx.export`` of a ``forward(*tensors)`` module.

    Every symbol of the spec's shapes (the sample count N, the free sizes such as the class count C) is one
    ``torch.export.Dim``, shared by the axes that name it, called ``dim_names[symbol]`` (the symbol itself by
    default); integer axes are static. The outer 1-tuple is the ``*tensors`` argument.
    """
    dims = {
        symbol: torch.export.Dim((dim_names or {}).get(symbol, symbol), min=bounds["min"])
        for symbol, bounds in dynamic_dims(spec, names).items()
    }
    by_name = {t.name: t for t in spec.inputs}
    per_input = tuple(
        {axis: dims[size] for axis, size in enumerate(by_name[name].shape) if isinstance(size, str)} for name in names
    )
    return (per_input,)


def eager_joint(loss: nn.Module, spec: LossSpec, inputs: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Eager reference of the joint graph: ``(loss, d loss.sum() / d pred)`` with autograd."""
    pred = inputs[spec.pred].detach().clone().requires_grad_(True)
    with torch.enable_grad():
        value = spec.call(loss, {**inputs, spec.pred: pred})
        (grad,) = torch.autograd.grad(value.sum(), pred)
    return value.detach(), grad


class JointLoss(nn.Module):
    """``forward(*tensors) -> (loss, grad_pred)``: a traced forward + backward graph, exportable as is.

    ``grad_pred`` is the gradient of ``loss.sum()`` with respect to ``pred`` (for the scalar reductions that is
    d loss / d pred; for ``reduction="none"`` it is the gradient a backward pass with an all-ones upstream gets).
    The loss's own tensors (``class_weight``) are buffers of this module, fed to the graph as its first inputs,
    so every exporter lifts them as it lifts any module state.
    """

    def __init__(
        self,
        graph: torch.fx.GraphModule,
        loss_type: str,
        names: tuple[str, ...],
        pred: str,
        state: Sequence[Tensor] = (),
    ) -> None:
        super().__init__()
        self.graph = graph
        self.loss_type = loss_type
        self.names = names
        self.pred = pred
        self.num_state = len(state)
        for index, tensor in enumerate(state):
            self.register_buffer(f"state_{index}", tensor.detach().clone())

    def forward(self, *tensors: Tensor) -> tuple[Tensor, Tensor]:
        state = [getattr(self, f"state_{index}") for index in range(self.num_state)]
        value, grad = self.graph(*state, *tensors)
        return value, grad

    def extra_repr(self) -> str:
        return f"loss_type={self.loss_type}, inputs={list(self.names)}, outputs=['loss', 'grad_{self.pred}']"


def joint_module(
    loss: nn.Module,
    spec: LossSpec,
    names: Sequence[str],
    *,
    example: Optional[Sequence[Tensor]] = None,
) -> JointLoss:
    """A module computing the loss and its gradient with respect to ``pred`` in one graph (see :class:`JointLoss`).

    Args:
        loss: a built loss module; its hyper-parameters become constants of the graph.
        spec: the loss's input spec (``spec_for(loss, variant)``).
        names: the graph's inputs in order (:func:`select_inputs`); must include ``pred``.
        example: inputs to trace with, positionally (default: :func:`example_inputs`).

    The trace is symbolic in every size, so the result runs at any N (including 0) and exports with
    :func:`dynamic_shapes`.
    """
    from torch.fx.experimental.proxy_tensor import make_fx

    names = tuple(names)
    if spec.pred not in names:
        raise ValueError(f"the joint graph needs {spec.pred!r} among its inputs, got {list(names)}")
    index = names.index(spec.pred)
    if example is None:
        example = example_inputs(loss, spec, names)
    if len(example) != len(names):
        raise ValueError(f"expected {len(names)} example inputs ({', '.join(names)}), got {len(example)}")
    # The loss's parameters and buffers (class_weight) enter the trace as inputs: make_fx fakes every input, but
    # would meet the module's real tensors inside the fake trace and refuse them.
    bound = spec.bind(loss, names)
    state = {**dict(bound.named_parameters()), **dict(bound.named_buffers())}
    state_names = tuple(state)

    def loss_and_grad(*flat: Tensor) -> tuple[Tensor, Tensor]:
        values, tensors = flat[: len(state_names)], list(flat[len(state_names) :])
        tensors[index] = tensors[index].detach().requires_grad_(True)
        with torch.enable_grad():
            value = torch.func.functional_call(bound, dict(zip(state_names, values)), tuple(tensors))
            (grad,) = torch.autograd.grad(value.sum(), tensors[index])
        return value.detach(), grad

    state_values = tuple(tensor.detach() for tensor in state.values())
    graph = make_fx(loss_and_grad, tracing_mode="symbolic")(*state_values, *example)
    return JointLoss(graph, spec.loss_type, names, spec.pred, state_values)


__all__ = [
    "DEFAULT_OPTIONAL_INPUTS",
    "EXAMPLE_N",
    "JointLoss",
    "dynamic_shapes",
    "eager_joint",
    "example_inputs",
    "joint_module",
    "select_inputs",
]
