"""The compiled training path of the IoU losses (``iou_loss._SavedBoxGradient``): with a weight, the forward
computes the loss and its closed-form derivative, the backward scales the saved derivative. Checked against the
eager fast path (itself checked against autograd in test_perf_paths) on boxes in every regime of the chain rule,
NaN / inf coordinates at weight-0 boxes included; without a weight the autograd graph is kept."""

import pytest
import torch
from test_perf_paths import _box_inputs

from visdet_export.losses import IoULoss
from visdet_export.losses.iou_loss import _iou_loss_saved_gradient


def _graphs_backend(graphs, inner: str):
    compile_inner = torch._dynamo.lookup_backend(inner)

    def backend(gm, example_inputs):
        graphs.append(gm.code)
        return compile_inner(gm, example_inputs)

    return backend


def _value_and_grad(fn, pred, target, weight, reduction):
    pred = pred.detach().clone().requires_grad_(True)
    value = fn(pred, target, weight, reduction_override=reduction)
    scale = torch.linspace(0.5, 2.0, value.numel(), dtype=value.dtype).view(value.shape)  # not uniform
    (grad,) = torch.autograd.grad((value * scale).sum(), pred)
    return value.detach(), grad


@pytest.mark.parametrize(
    "mode, weight_shape, backend",
    [
        ("log", "rows", "inductor"),
        ("log", "elements", "aot_eager"),
        ("linear", "rows", "aot_eager"),
        ("square", "elements", "aot_eager"),
    ],
)
def test_compiled_iou_matches_eager_and_takes_the_closed_form(mode, weight_shape, backend):
    loss = IoULoss(mode=mode, eps=0.05 if mode == "linear" else 1e-6)
    pred, target, weight, dead = _box_inputs(weight_shape, seed=21)
    torch._dynamo.reset()
    graphs = []
    compiled = torch.compile(loss, fullgraph=True, dynamic=True, backend=_graphs_backend(graphs, backend))
    for dtype, tolerance in ((torch.float64, dict(rtol=1e-10, atol=1e-12)), (torch.float32, dict(rtol=2e-5, atol=1e-6))):
        inputs = (pred.to(dtype), target.to(dtype), weight.to(dtype))
        for reduction in ("mean", "none"):
            want = _value_and_grad(loss, *inputs, reduction)
            got = _value_and_grad(compiled, *inputs, reduction)
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, **tolerance)
            assert (got[1][dead] == 0).all() and torch.isfinite(got[1]).all() and (got[1] != 0).any()
            assert got[1].is_contiguous()
    assert graphs and all("autograd_function_apply" in code for code in graphs)


def test_compiled_iou_without_weight_keeps_the_autograd_graph():
    """Unmasked, inductor would run the fused closed form as a scalar loop (see _SavedBoxGradient)."""
    loss = IoULoss(mode="log")
    pred, target, _, dead = _box_inputs("rows", seed=22)
    pred, target = pred[~dead[:, 0]], target[~dead[:, 0]]
    torch._dynamo.reset()
    graphs = []
    compiled = torch.compile(loss, fullgraph=True, dynamic=True, backend=_graphs_backend(graphs, "aot_eager"))
    for got, want in zip(_value_and_grad(compiled, pred, target, None, "mean"), _value_and_grad(loss, pred, target, None, "mean")):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert graphs and not any("autograd_function_apply" in code for code in graphs)


def test_compiled_iou_empty_input():
    loss = IoULoss(mode="log")
    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, dynamic=True)
    for n in (5, 0):
        pred, target = torch.rand(n, 4) * 3, torch.rand(n, 4) * 3
        pred[:, 2:] += pred[:, :2]
        target[:, 2:] += target[:, :2]
        value, grad = _value_and_grad(compiled, pred, target, torch.ones(n), "mean")
        assert grad.shape == (n, 4) and torch.isfinite(grad).all()
        if n == 0:
            assert value.item() == 0.0


def test_saved_box_gradient_is_once_differentiable():
    """Called directly, the Function refuses a second derivative instead of returning one without the derivative
    of the saved gradient."""
    pred, target, weight, dead = _box_inputs("rows", seed=23)
    keep = ~dead[:, 0]
    pred = pred.nan_to_num().requires_grad_(True)
    value = _iou_loss_saved_gradient(pred, target.nan_to_num(), keep, "log", 1e-6)
    scale = torch.tensor(1.5, dtype=pred.dtype, requires_grad=True)
    (first,) = torch.autograd.grad((value * weight * scale).sum(), pred, create_graph=True)
    assert (first[dead] == 0).all()
    with pytest.raises(RuntimeError, match="differentiate twice"):
        first.square().sum().backward()
