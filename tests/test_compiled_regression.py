"""The compiled training path of the regression and IoU losses (``numerics._SavedRegressionGradient``,
``iou_loss._SavedBoxGradient``): the forward computes the loss and its closed-form derivative, the backward scales
the saved derivative. Checked against the eager fast path (itself checked against autograd in test_perf_paths) on
inputs in every regime of the formulas, NaN / inf at weight-0 elements and boxes included; a trained weight gets
its gradient; IoU without a weight keeps the autograd graph."""

import pytest
import torch
from conftest import compile_privately
from test_perf_paths import REGRESSION_CASES, _box_inputs, _regression_inputs

from visdet_export.losses import IoULoss
from visdet_export.losses.iou_loss import _iou_loss_saved_gradient

# inductor in the dtype of training, the traced graph (aot_eager) tightly in float64
_DTYPE_TOLERANCE = {
    "inductor": (torch.float32, dict(rtol=2e-5, atol=1e-6)),
    "aot_eager": (torch.float64, dict(rtol=1e-10, atol=1e-12)),
}


def _graphs_backend(graphs, inner: str):
    compile_inner = torch._dynamo.lookup_backend(inner)

    def backend(gm, example_inputs):
        graphs.append(gm.code)
        return compile_inner(gm, example_inputs)

    return backend


def _value_and_grad(fn, pred, target, weight, reduction, trained_weight=False):
    pred = pred.detach().clone().requires_grad_(True)
    weight = None if weight is None else weight.detach().clone().requires_grad_(trained_weight)
    value = fn(pred, target, weight, reduction_override=reduction)
    scale = torch.linspace(0.5, 2.0, value.numel(), dtype=value.dtype).view(value.shape)  # not uniform
    grads = torch.autograd.grad((value * scale).sum(), (pred, weight) if trained_weight else (pred,))
    return (value.detach(), *grads)


def _check_compiled_closed_form(module, backend, inputs, masked):
    """Compiled ``module`` against eager for mean / none reductions and a trained weight: same values and gradients,
    gradient exactly 0 where ``masked`` (NaN / inf inputs there), finite, contiguous, non-zero elsewhere; the
    Function of the closed form in every graph."""
    graphs = []
    compiled = compile_privately(module, fullgraph=True, dynamic=True, backend=_graphs_backend(graphs, backend))
    dtype, tolerance = _DTYPE_TOLERANCE[backend]
    inputs = tuple(x.to(dtype) for x in inputs)
    for reduction, trained in (("mean", False), ("none", False), ("mean", True)):
        want = _value_and_grad(module, *inputs, reduction, trained)
        got = _value_and_grad(compiled, *inputs, reduction, trained)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, **tolerance)
        grad = got[1]
        assert (grad[masked] == 0).all() and torch.isfinite(grad).all() and (grad[~masked] != 0).any()
        assert grad.is_contiguous()
        if trained:
            assert got[2].abs().sum() > 0
    assert graphs and all("autograd_function_apply" in code for code in graphs)


@pytest.mark.parametrize("weight_shape", ["rows", "elements"])
@pytest.mark.parametrize(
    "module",
    [case[1] for case in REGRESSION_CASES],
    ids=[f"{type(case[1]).__name__}-{i}" for i, case in enumerate(REGRESSION_CASES)],
)
def test_compiled_regression_matches_eager_and_takes_the_closed_form(module, weight_shape):
    pred, target, weight, masked = _regression_inputs(weight_shape, seed=31)
    inductor = weight_shape == "rows" and type(module).__name__ in ("L1Loss", "BalancedL1Loss")
    _check_compiled_closed_form(module, "inductor" if inductor else "aot_eager", (pred, target, weight), masked)


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
    _check_compiled_closed_form(loss, backend, (pred, target, weight), dead)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_compiled_iou_half_precision_matches_eager(dtype):
    """bfloat16 boxes save their derivative in bfloat16 (numerics.saved_gradient_dtype), float16 in float32: the
    gradient within one rounding of eager's, zero at weight 0."""
    loss = IoULoss(mode="log")
    pred, target, weight, dead = _box_inputs("rows", seed=24)
    pred, target, weight = pred.to(dtype), target.to(dtype), weight.to(dtype)
    compiled = compile_privately(loss, fullgraph=True, dynamic=True, backend="aot_eager")
    want = _value_and_grad(loss, pred, target, weight, "mean")
    got = _value_and_grad(compiled, pred, target, weight, "mean")
    assert got[1].dtype == want[1].dtype == dtype
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1].float(), want[1].float(), rtol=torch.finfo(dtype).eps, atol=1e-6)
    assert (got[1][dead] == 0).all() and (got[1][~dead] != 0).any()


def test_compiled_iou_without_weight_keeps_the_autograd_graph():
    """Unmasked, inductor would run the fused closed form as a scalar loop (see _SavedBoxGradient)."""
    loss = IoULoss(mode="log")
    pred, target, _, dead = _box_inputs("rows", seed=22)
    pred, target = pred[~dead[:, 0]], target[~dead[:, 0]]
    graphs = []
    compiled = compile_privately(loss, fullgraph=True, dynamic=True, backend=_graphs_backend(graphs, "aot_eager"))
    want = _value_and_grad(loss, pred, target, None, "mean")
    for got, expected in zip(_value_and_grad(compiled, pred, target, None, "mean"), want):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert graphs and not any("autograd_function_apply" in code for code in graphs)


def test_compiled_iou_empty_input():
    loss = IoULoss(mode="log")
    compiled = compile_privately(loss, fullgraph=True, dynamic=True)
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
    value = _iou_loss_saved_gradient(pred, target.nan_to_num(), keep, "log", 1e-6, pred.dtype)
    scale = torch.tensor(1.5, dtype=pred.dtype, requires_grad=True)
    (first,) = torch.autograd.grad((value * weight * scale).sum(), pred, create_graph=True)
    assert (first[dead] == 0).all()
    with pytest.raises(RuntimeError, match="differentiate twice"):
        first.square().sum().backward()
