"""The compiled training path of the focal, quality focal and sigmoid cross-entropy losses (numerics "compiled
training path"): an autograd.Function whose forward computes the element-wise loss and its closed-form derivative,
and whose backward scales the saved derivative. Checked against the autograd formulation (float64 to 1e-10),
compiled against eager, for a trained weight, at N = 0, and for double backward (which must raise, not miss a
term)."""

import importlib

import pytest
import torch
from conftest import compile_privately

from visdet_export.losses import CrossEntropyLoss, FocalLoss, QualityFocalLoss
from visdet_export.losses.focal_loss import _focal_elementwise, _focal_elementwise_binary
from visdet_export.losses.gfocal_loss import _quality_focal_elementwise
from visdet_export.numerics import (
    bce_closed_form,
    bce_with_logits,
    focal_closed_form,
    log1p_exp_neg_abs,
    log1p_unit,
    quality_focal_closed_form,
)

NUMERICS = importlib.import_module("visdet_export.numerics")


def _logits(n: int = 64, c: int = 7, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g, dtype=torch.float64) * 4
    x[0] = torch.tensor([0.0, -0.0, 30.0, -30.0, 100.0, -100.0, 1e-3][:c], dtype=torch.float64)  # edges
    return x.to(dtype)


def _targets(x: torch.Tensor, soft: bool, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if soft:
        t = torch.rand(x.shape, generator=g, dtype=torch.float64)
        t[:, 0] = 0.0
        t[:, 1] = 1.0
        return t.to(x.dtype)
    return (torch.rand(x.shape, generator=g, dtype=torch.float64) < 0.3).to(x.dtype)


def _autograd_value_and_grad(fn, x: torch.Tensor, *args):
    x = x.detach().clone().requires_grad_(True)
    value = fn(x, *args)
    (grad,) = torch.autograd.grad(value.sum(), x)
    return value.detach(), grad


@pytest.mark.parametrize("soft", [False, True], ids=["binary", "soft"])
@pytest.mark.parametrize("alpha", [-1.0, 0.0, 0.25, 1.0])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 1.5, 2.0, 3.0])
def test_focal_closed_form_is_the_autograd_derivative(gamma, alpha, soft):
    x = _logits()
    t = _targets(x, soft)
    want_value, want_grad = _autograd_value_and_grad(_focal_elementwise, x, t, gamma, alpha, False)
    value, grad = focal_closed_form(x, t, gamma, alpha)
    torch.testing.assert_close(value, want_value, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("alpha", [-1.0, 0.25])
@pytest.mark.parametrize("gamma", [0.0, 1.5, 2.0])
def test_binary_target_focal_is_the_general_formulation(gamma, alpha, dtype):
    """The sign-flip formulation that TorchScript and export run for targets from labels: the general formulation's
    values and gradients, bit for bit in float32 and float64 (logits 0, -0, +-30, +-100 included)."""
    x = _logits(dtype=dtype)
    t = _targets(x, soft=False)
    t[0] = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0], dtype=dtype)
    want = _autograd_value_and_grad(_focal_elementwise, x, t, gamma, alpha, False)
    got = _autograd_value_and_grad(_focal_elementwise_binary, x, t, gamma, alpha)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 1.5, 2.0, 3.0])
def test_quality_focal_closed_form_is_the_autograd_derivative(beta):
    x = _logits()
    t = _targets(x, soft=True)
    t[1] = torch.sigmoid(x[1])  # |t - sigmoid(x)| = 0: the zero-base convention of the fractional powers
    want_value, want_grad = _autograd_value_and_grad(_quality_focal_elementwise, x, t, beta, False)
    value, grad = quality_focal_closed_form(x, t, beta)
    torch.testing.assert_close(value, want_value, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("soft", [False, True], ids=["binary", "soft"])
def test_bce_closed_form_is_the_autograd_derivative(soft):
    x = _logits()
    t = _targets(x, soft)
    want_value, want_grad = _autograd_value_and_grad(lambda z, u: bce_with_logits(z, u, log1p_exp_neg_abs(z)), x, t)
    value, grad = bce_closed_form(x, t)
    torch.testing.assert_close(value, want_value, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-12)


def test_log1p_unit_float32_relative_error():
    e = torch.cat([torch.rand(1_000_000, dtype=torch.float64) ** 4, torch.tensor([0.0, 1e-30, 1e-7, 0.5, 1.0])])
    want = torch.log1p(e)
    got = log1p_unit(e.float()).double()
    assert got[-5].item() == 0.0
    rel = ((got - want).abs() / want.clamp(min=1e-300))[e > 0]
    assert rel.max().item() < 3e-7
    assert torch.equal(log1p_unit(e), torch.log1p(e))  # float64: ATen's log1p


# --- compiled -------------------------------------------------------------------------------------------------


def _losses():
    return {
        "focal": FocalLoss(gamma=2.0, alpha=0.25),
        "focal_g15": FocalLoss(gamma=1.5, alpha=-1.0),
        "qfl": QualityFocalLoss(beta=2.0),
        "qfl_b15": QualityFocalLoss(beta=1.5),
        "bce": CrossEntropyLoss(use_sigmoid=True),
        "bce_soft": CrossEntropyLoss(use_sigmoid=True),
    }


def _inputs(kind: str, n: int, c: int = 9, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pred = (torch.randn(n, c, generator=g, dtype=torch.float64) * 3).to(dtype)
    labels = torch.randint(0, c + 1, (n,), generator=g)
    weight = torch.rand(n, generator=g, dtype=torch.float64).to(dtype) + 0.1
    weight[::4] = 0.0
    pred[::4] = float("nan")  # weight 0: must reach neither value nor gradient
    if kind.startswith("focal") or kind == "bce":
        target = labels
        if kind == "bce":
            target[1::5] = -100  # ignored
    elif kind == "bce_soft":  # soft targets of pred's shape, NaN where the weight is 0
        target = torch.rand(n, c, generator=g, dtype=torch.float64).to(dtype)
        target[::4] = float("nan")
    else:
        scores = torch.rand(n, generator=g, dtype=torch.float64).to(dtype)
        target = torch.where(labels.unsqueeze(1) == torch.arange(c), scores.unsqueeze(1), 0.0)
    avg_factor = torch.tensor(max(n, 1) / 3.0, dtype=dtype)
    return pred, target, weight, avg_factor


def _run(loss, pred, target, weight, avg_factor, reduction, trained_weight=False):
    pred = pred.detach().clone().requires_grad_(True)
    weight = weight.detach().clone().requires_grad_(trained_weight)
    value = loss(pred, target, weight, avg_factor if reduction == "mean" else None, reduction_override=reduction)
    scale = torch.linspace(0.5, 2.0, value.numel(), dtype=value.dtype).view(value.shape)  # not uniform
    grads = torch.autograd.grad((value * scale).sum(), (pred, weight) if trained_weight else (pred,))
    return (value.detach(), *grads)


def _graphs_backend(graphs):
    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return backend


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind", ["focal", "focal_g15", "qfl", "qfl_b15", "bce", "bce_soft"])
def test_compiled_matches_eager_and_takes_the_closed_form(kind, reduction):
    loss = _losses()[kind]
    graphs = []
    traced = compile_privately(loss, fullgraph=True, dynamic=True, backend=_graphs_backend(graphs))
    compiled = compile_privately(loss, fullgraph=True, dynamic=True)
    for n in (20, 33):
        inputs = _inputs(kind, n)
        want = _run(loss, *inputs, reduction)
        for fn in (traced, compiled):
            got = _run(fn, *inputs, reduction)
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6)
            assert not torch.isnan(got[1]).any()
    # the Function of the compiled training path is in the graph, and so is the product that keeps its gradient
    # (not for sigmoid CE on targets of pred's shape, which keeps the autograd formulation)
    code = "\n".join(gm.code for gm in graphs)
    assert ("autograd_function_apply" in code) == (kind != "bce_soft")
    assert ("prod" in code) == (reduction != "none" and kind != "bce_soft")


@pytest.mark.parametrize("kind", ["focal", "qfl", "bce"])
def test_compiled_trained_weight_gets_its_gradient(kind):
    loss = _losses()[kind]
    compiled = compile_privately(loss, fullgraph=True, dynamic=True)
    inputs = _inputs(kind, 25)
    want = _run(loss, *inputs, "mean", trained_weight=True)
    got = _run(compiled, *inputs, "mean", trained_weight=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6)
    assert got[2].abs().sum() > 0


@pytest.mark.parametrize("kind", ["focal", "qfl", "bce"])
def test_compiled_float64_matches_eager_tightly(kind):
    loss = _losses()[kind]
    compiled = compile_privately(loss, fullgraph=True, dynamic=True)
    inputs = _inputs(kind, 30, dtype=torch.float64)
    want = _run(loss, *inputs, "mean")
    got = _run(compiled, *inputs, "mean")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["focal", "qfl", "bce"])
def test_compiled_empty_input(kind):
    loss = _losses()[kind]
    compiled = [compile_privately(loss, fullgraph=True, dynamic=True, backend=b) for b in ("inductor", "aot_eager")]
    for n in (5, 0):
        for backend_fn in compiled:
            value, grad = _run(backend_fn, *_inputs(kind, n), "mean")
            assert grad.shape == (n, 9)
            if n == 0:
                assert value.item() == 0.0


def test_saved_gradient_dtype():
    """bfloat16 keeps its gradient in bfloat16 (float32's range); float16 keeps float32 (loss scaling)."""
    assert NUMERICS.saved_gradient_dtype(torch.bfloat16) == torch.bfloat16
    assert NUMERICS.saved_gradient_dtype(torch.float16) == torch.float32
    assert NUMERICS.saved_gradient_dtype(torch.float32) == torch.float32
    assert NUMERICS.saved_gradient_dtype(torch.float64) == torch.float64


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", ["focal", "qfl", "bce"])
def test_compiled_half_precision_matches_eager(kind, dtype):
    """Half-precision inputs compute in float32 under compile too; the gradient comes back in the input dtype,
    within one rounding of eager's (bfloat16's saved derivative is rounded once more), NaN-free at weight 0."""
    loss = _losses()[kind]
    compiled = compile_privately(loss, fullgraph=True, dynamic=True, backend="aot_eager")
    inputs = _inputs(kind, 40, dtype=dtype)
    want = _run(loss, *inputs, "mean")
    got = _run(compiled, *inputs, "mean")
    assert got[0].dtype == want[0].dtype == torch.float32 and got[1].dtype == want[1].dtype == dtype
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    ulp = torch.finfo(dtype).eps
    torch.testing.assert_close(got[1].float(), want[1].float(), rtol=ulp, atol=1e-6)
    assert not torch.isnan(got[1]).any() and (got[1][::4] == 0).all()


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_float16_gradients_survive_loss_scaling(backend):
    """float16 training scales the loss (GradScaler, 2**16) so that gradients of ~1e-8, below float16's range,
    survive until unscaled: the compiled path keeps its saved derivative in float32, as eager does. Saved in
    float16 these gradients flush to 0 (or its least subnormal) before the scale."""
    loss = FocalLoss(gamma=2.0, alpha=0.25, reduction="sum")
    compiled = compile_privately(loss, fullgraph=True, dynamic=True, backend=backend)
    pred = torch.linspace(-7.5, -5.5, 64, dtype=torch.float64).view(8, 8).to(torch.float16)
    labels = torch.full((8,), 8)  # background: every element a negative with a gradient of ~1e-9 .. 1e-7
    grads = []
    for fn in (loss, compiled):
        leaf = pred.clone().requires_grad_(True)
        (fn(leaf, labels) * 2.0**16).backward()
        grads.append(leaf.grad)
    eager, got = grads
    assert (eager.float() * 2.0**-16 < 6e-8).any()  # below float16's least subnormal before the scale
    torch.testing.assert_close(got, eager, rtol=2e-3, atol=0.0)


def test_compiled_soft_one_hot_focal_targets_and_target_gradient(monkeypatch):
    loss = FocalLoss(gamma=2.0, alpha=0.25)
    compiled = compile_privately(loss, fullgraph=True, dynamic=True)
    g = torch.Generator().manual_seed(3)
    pred = torch.randn(17, 6, generator=g, dtype=torch.float64) * 3
    target = torch.rand(17, 6, generator=g, dtype=torch.float64)
    want = _run(loss, pred, target, torch.ones(17, dtype=torch.float64), None, "sum")
    got = _run(compiled, pred, target, torch.ones(17, dtype=torch.float64), None, "sum")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # a target that takes a gradient stays on the autograd formulation (the Function gives it none); the reference
    # is that formulation run eagerly (the eager fast path gives targets no gradient either)
    p, t = pred.clone().requires_grad_(True), target.clone().requires_grad_(True)
    got_t = torch.autograd.grad(compiled(p, t, reduction_override="sum"), (p, t))
    monkeypatch.setattr(importlib.import_module("visdet_export.losses.focal_loss"), "eager_fast_path", lambda t: False)
    monkeypatch.setattr(NUMERICS, "eager_fast_path", lambda t: False)
    p, t = pred.clone().requires_grad_(True), target.clone().requires_grad_(True)
    want_t = torch.autograd.grad(loss(p, t, reduction_override="sum"), (p, t))
    for a, b in zip(got_t, want_t):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
@pytest.mark.parametrize("kind", ["focal", "qfl"])
def test_compiled_double_backward_raises(kind, backend):
    """The saved derivative is not differentiable: a second derivative must raise, never come out without the
    derivative of the saved term (with donated buffers off, so the error is not the donation check's)."""
    loss = _losses()[kind]
    compiled = compile_privately(loss, fullgraph=True, dynamic=True, backend=backend)
    pred, target, weight, avg_factor = _inputs(kind, 12)
    pred = pred.nan_to_num().requires_grad_(True)
    scale = torch.tensor(1.5, requires_grad=True)  # an upstream gradient that itself takes a gradient
    with torch._functorch.config.patch(donated_buffer=False):
        with pytest.raises(RuntimeError):
            value = compiled(pred, target, weight, avg_factor) * scale
            (grad,) = torch.autograd.grad(value, pred, create_graph=True)
            grad.square().sum().backward()


@pytest.mark.parametrize("kind", ["focal", "qfl"])
def test_saved_closed_form_is_once_differentiable(kind):
    """Called directly (outside dynamo, which never records a second-order graph for it), the Function refuses a
    second derivative instead of returning one without the derivative of the saved gradient."""
    x = _logits(12, 5).requires_grad_(True)
    t = _targets(x, soft=True)
    if kind == "focal":
        value, grad = NUMERICS.focal_with_saved_gradient(x, t, 2.0, 0.25, x.dtype)
    else:
        value, grad = NUMERICS.quality_focal_with_saved_gradient(x, t, 2.0, x.dtype)
    assert not grad.requires_grad
    scale = torch.tensor(1.5, dtype=x.dtype, requires_grad=True)
    (first,) = torch.autograd.grad((value * scale).sum(), x, create_graph=True)
    torch.testing.assert_close(first.detach(), 1.5 * grad)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        first.square().sum().backward()
