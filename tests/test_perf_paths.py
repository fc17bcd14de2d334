"""The eager fast paths (closed-form focal / QFL / regression gradients, the bitwise select that masks weight-0
elements) against the autograd formulation that compile, TorchScript and export run: same values, same
gradients, a trained ``weight`` included (the closed-form path once returned no gradient for it), NaN-safe where
weight is 0."""

import importlib
import pkgutil

import pytest
import torch

from visdet_export import build_loss
from visdet_export.export.torchscript import script_loss
from visdet_export.losses import (
    BalancedL1Loss,
    FocalLoss,
    GIoULoss,
    IoULoss,
    L1Loss,
    MSELoss,
    QualityFocalLoss,
    SmoothL1Loss,
    sigmoid_focal_loss,
)
from visdet_export.specs import CONFIG_VARIANTS, representative_configs, spec_for

NUMERICS_MODULE = importlib.import_module("visdet_export.numerics")
LOSS_MODULES = [importlib.import_module("visdet_export.losses." + m.name) for m in pkgutil.iter_modules(
    importlib.import_module("visdet_export.losses").__path__)]
OWNERS = {"focal": "focal_loss", "qfl": "gfocal_loss"}


def _inputs(kind: str, weight_shape: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n, c = 37, 5
    pred = (torch.randn(n, c, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    if kind == "focal":
        target = torch.randint(0, c + 1, (n,), generator=g)
    else:
        labels = torch.randint(0, c + 1, (n,), generator=g)
        scores = torch.rand(n, 1, generator=g, dtype=torch.float64)
        target = torch.where(labels.unsqueeze(1) == torch.arange(c), scores, 0.0)
    shape = (n,) if weight_shape == "rows" else (n, c)
    weight = torch.rand(shape, generator=g, dtype=torch.float64) + 0.1
    weight = torch.where(torch.rand(shape, generator=g, dtype=torch.float64) < 0.3, 0.0, weight)
    return pred, target, weight.requires_grad_(True)


def _value_and_grads(owner: str, module, pred, target, weight, fast: bool, monkeypatch, reduction="mean",
                     trained=True, **kwargs):
    """Value, d/d pred and (for a trained weight) d/d weight of one call: on the eager fast path, or with
    ``eager_fast_path`` patched off in the loss's module and in numerics (the autograd formulation and the
    ``torch.where`` masking that compile, TorchScript and ONNX run)."""
    with monkeypatch.context() as patch:
        if not fast:
            owner_module = importlib.import_module("visdet_export.losses." + owner)
            if hasattr(owner_module, "eager_fast_path"):  # the regression losses ask numerics.closed_form_path
                patch.setattr(owner_module, "eager_fast_path", lambda t: False)
            patch.setattr(NUMERICS_MODULE, "eager_fast_path", lambda t: False)
        pred = pred.detach().clone().requires_grad_(True)
        weight = weight.detach().clone().requires_grad_(trained)
        value = module(pred, target, weight, reduction_override=reduction, **kwargs)
        scale = torch.linspace(0.5, 2.0, value.numel(), dtype=value.dtype).view(value.shape)  # not uniform
        grads = torch.autograd.grad((value * scale).sum(), (pred, weight) if trained else (pred,))
    return (value.detach(), *grads)


def _fast_path_matches_autograd(owner: str, module, pred, target, weight, monkeypatch, reduction="mean",
                                trained=True, **kwargs):
    """Asserts the fast path equals the autograd formulation and is finite; returns the fast path's results."""
    fast = _value_and_grads(owner, module, pred, target, weight, True, monkeypatch, reduction, trained, **kwargs)
    slow = _value_and_grads(owner, module, pred, target, weight, False, monkeypatch, reduction, trained, **kwargs)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert all(torch.isfinite(x).all() for x in fast)
    return fast


CASES = [
    ("focal", FocalLoss(gamma=2.0, alpha=0.25), "rows"),
    ("focal", FocalLoss(gamma=2.0, alpha=0.25), "elements"),
    ("focal", FocalLoss(gamma=1.5, alpha=-1.0), "elements"),
    ("focal", FocalLoss(gamma=2.0, alpha=1.0), "rows"),
    ("focal", FocalLoss(gamma=1.0, alpha=0.0), "rows"),
    ("focal", FocalLoss(gamma=0.0, alpha=0.5), "elements"),
    ("focal", FocalLoss(gamma=0.5, alpha=0.75), "rows"),
    ("qfl", QualityFocalLoss(beta=2.0), "rows"),
    ("qfl", QualityFocalLoss(beta=1.5), "rows"),
]


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize(
    "loss_type, module, weight_shape", CASES, ids=[f"{c[0]}-{c[2]}-{i}" for i, c in enumerate(CASES)]
)
def test_fast_path_matches_autograd_including_weight_gradient(loss_type, module, weight_shape, reduction, monkeypatch):
    """A frozen weight takes the closed form; a trained one the autograd formulation, and gets a gradient."""
    pred, target, weight = _inputs(loss_type, weight_shape)
    owner = OWNERS[loss_type]
    _fast_path_matches_autograd(owner, module, pred, target, weight, monkeypatch, reduction, False, avg_factor=7.0)
    fast = _fast_path_matches_autograd(owner, module, pred, target, weight, monkeypatch, reduction, avg_factor=7.0)
    assert fast[2].abs().sum() > 0


@pytest.mark.parametrize("loss_type, module", [("focal", FocalLoss()), ("qfl", QualityFocalLoss())])
def test_fast_path_matches_torchscript(loss_type, module, monkeypatch):
    pred, target, weight = _inputs(loss_type, "rows", seed=1)
    scripted = script_loss(module)
    eager = _value_and_grads(OWNERS[loss_type], module, pred, target, weight, True, monkeypatch, avg_factor=7.0)
    p = pred.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    value = scripted(p, target, w, 7.0)
    gp, gw = torch.autograd.grad(value * 0.5, (p, w))  # _value_and_grads' scale for one element
    for a, b in zip(eager, (value.detach(), gp, gw)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_frozen_weight_keeps_in_place_path_and_no_weight_grad():
    pred, target, weight = _inputs("focal", "elements")
    weight = weight.detach()
    value = sigmoid_focal_loss(pred, target, weight)
    (gp,) = torch.autograd.grad(value, pred)
    assert torch.isfinite(gp).all()


@pytest.mark.parametrize("loss_type, module", [("focal", FocalLoss()), ("qfl", QualityFocalLoss())])
def test_trained_weight_nan_inputs_masked(loss_type, module, monkeypatch):
    pred, target, weight = _inputs(loss_type, "rows", seed=2)
    pred = pred.detach().clone()
    masked = weight.detach() == 0
    pred[masked] = float("nan")
    for trained in (False, True):
        gp = _fast_path_matches_autograd(
            OWNERS[loss_type], module, pred, target, weight, monkeypatch, "mean", trained, avg_factor=7.0
        )[1]
        assert (gp[masked] == 0).all()


# --- regression losses: closed-form eager gradients and the bitwise select ------------------------------------

REGRESSION_CASES = [
    ("smooth_l1_loss", L1Loss()),
    ("smooth_l1_loss", SmoothL1Loss(beta=0.5)),
    ("smooth_l1_loss", SmoothL1Loss(beta=2.0)),  # beta > 1: the autograd formulation's other branch
    ("mse_loss", MSELoss()),
    ("balanced_l1_loss", BalancedL1Loss(alpha=0.5, gamma=1.5, beta=0.7)),
    ("balanced_l1_loss", BalancedL1Loss(alpha=0.4, gamma=1.0, beta=1.0)),
]


def _regression_inputs(weight_shape: str, seed: int):
    """Differences spread over both sides of every threshold, exact zeros and exact thresholds included; NaN and
    inf in pred and target wherever the weight is 0."""
    g = torch.Generator().manual_seed(seed)
    n = 41
    target = torch.randn(n, 4, generator=g, dtype=torch.float64)
    diff = torch.randn(n, 4, generator=g, dtype=torch.float64) * 1.5
    diff[:3] = torch.tensor([0.0, 0.5, -0.7, 1.0], dtype=torch.float64)
    pred = target + diff
    shape = (n,) if weight_shape == "rows" else (n, 4)
    weight = torch.rand(shape, generator=g, dtype=torch.float64) + 0.1
    weight = torch.where(torch.rand(shape, generator=g, dtype=torch.float64) < 0.3, 0.0, weight)
    weight[1] = 1.0
    masked = (weight == 0).unsqueeze(1).expand(n, 4) if weight_shape == "rows" else weight == 0
    pred = torch.where(masked, float("nan"), pred)
    target = torch.where(masked, float("inf"), target)
    return pred, target, weight, masked


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("weight_shape", ["rows", "elements"])
@pytest.mark.parametrize(
    "owner, module", REGRESSION_CASES, ids=[f"{type(m).__name__}-{i}" for i, (_, m) in enumerate(REGRESSION_CASES)]
)
def test_regression_fast_path_matches_autograd(owner, module, weight_shape, reduction, monkeypatch):
    """A trained weight gets its gradient from autograd; a frozen one is applied in the closed form (MSE with an
    element weight: inside its terms, ``weighted_terms``)."""
    pred, target, weight, masked = _regression_inputs(weight_shape, seed=3)
    for trained in (False, True):
        fast = _fast_path_matches_autograd(
            owner, module, pred, target, weight, monkeypatch, reduction, trained, avg_factor=7.0
        )
        gp = fast[1]
        assert (gp[masked] == 0).all() and (gp[~masked] != 0).any()
    assert fast[2].abs().sum() > 0


@pytest.mark.parametrize("weight_shape", ["rows", "elements"])
def test_mse_frozen_weight_double_backward(weight_shape):
    """Double backward through the closed form differentiates the autograd formulation times the weight, also
    where the weight was applied inside the closed form's terms."""
    pred, target, weight, masked = _regression_inputs(weight_shape, seed=5)
    keep = ~masked.any(dim=1)
    pred, target, weight = pred[keep][:4], target[keep][:4], weight[keep][:4]
    live = pred.detach().clone().requires_grad_(True)
    assert torch.autograd.gradgradcheck(lambda p: MSELoss()(p, target, weight.detach(), avg_factor=3.0), (live,))


@pytest.mark.parametrize("owner, module", REGRESSION_CASES[:4], ids=["L1Loss", "SmoothL1Loss", "SmoothL1Loss_beta2",
                                                                  "MSELoss"])
def test_regression_target_with_gradient_takes_autograd_path(owner, module):
    """The closed form differentiates pred only: a target that needs a gradient (distillation) still gets one."""
    g = torch.Generator().manual_seed(4)
    pred = torch.randn(9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randn(9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    gp, gt = torch.autograd.grad(module(pred, target), (pred, target))
    torch.testing.assert_close(gt, -gp)
    assert gt.abs().sum() > 0


def _box_inputs(weight_shape: str, seed: int):
    """Box pairs in every regime of the IoU chain rule: overlapping, disjoint (IoU below eps), identical (ties on
    all four coordinates), one shared coordinate, inverted and zero-width predictions, one box inside the other,
    touching boxes (clamps exactly at their bound); NaN / inf coordinates wherever the weight is 0."""
    g = torch.Generator().manual_seed(seed)
    n = 48
    corner = torch.rand(n, 2, generator=g, dtype=torch.float64) * 10
    target = torch.cat([corner, corner + 0.5 + torch.rand(n, 2, generator=g, dtype=torch.float64) * 5], dim=1)
    pred = target + torch.randn(n, 4, generator=g, dtype=torch.float64) * 1.5
    pred[0] = target[0]  # identical: ties everywhere
    pred[1, 0] = target[1, 0]  # one tie
    pred[2] = target[2] + 20.0  # disjoint
    pred[3] = pred[3, [2, 3, 0, 1]]  # inverted
    pred[4] = target[4] + torch.tensor([0.3, -0.2, 0.0, 0.4], dtype=torch.float64)
    pred[4, 2] = pred[4, 0]  # zero width
    pred[5] = target[5] + torch.tensor([0.1, 0.1, -0.1, -0.1], dtype=torch.float64)  # inside
    pred[6] = target[6] + 0.1
    pred[6, 0], pred[6, 2] = target[6, 2], target[6, 2] + 1.0  # touching: overlap width exactly 0
    shape = (n,) if weight_shape == "rows" else (n, 4)
    weight = torch.rand(shape, generator=g, dtype=torch.float64) + 0.1
    weight = torch.where(torch.rand(shape, generator=g, dtype=torch.float64) < 0.25, 0.0, weight)
    weight[:7] = 1.0
    dead = weight == 0 if weight_shape == "rows" else (weight == 0).all(1)
    dead = dead.unsqueeze(1).expand(n, 4)
    if weight_shape == "elements":
        weight[~dead] = torch.where(weight[~dead] == 0, 0.3, weight[~dead])  # a box is masked by a zero mean only
    pred = torch.where(dead, float("nan"), pred)
    target = torch.where(dead, float("inf"), target)
    return pred, target, weight, dead


BOX_CASES = [
    IoULoss(mode="log"), IoULoss(mode="linear", eps=0.05), IoULoss(mode="square"), GIoULoss(), GIoULoss(eps=0.5)
]


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("weight_shape", ["rows", "elements"])
@pytest.mark.parametrize("module", BOX_CASES, ids=[f"{type(m).__name__}-{i}" for i, m in enumerate(BOX_CASES)])
def test_box_loss_fast_path_matches_autograd(module, weight_shape, reduction, monkeypatch):
    """The hand-written IoU / GIoU chain rule against autograd through the ATen formulation, in every regime;
    a trained weight takes autograd and gets its gradient."""
    pred, target, weight, dead = _box_inputs(weight_shape, seed=12)
    owner = "iou_loss"
    _, gp = _fast_path_matches_autograd(owner, module, pred, target, weight, monkeypatch, reduction, False)
    _, _, gw = _fast_path_matches_autograd(owner, module, pred, target, weight, monkeypatch, reduction, avg_factor=5.0)
    assert (gp[dead] == 0).all() and (gp[~dead] != 0).any() and gw.abs().sum() > 0
    assert (gp[1] != 0).any()  # one tied coordinate


def test_box_loss_fast_path_double_backward():
    """Under create_graph the closed-form box gradient differentiates the autograd formulation instead."""
    pred, target, weight, _ = _box_inputs("rows", seed=13)
    keep = ~torch.isnan(pred).any(1)
    pred, target, weight = pred[keep][7:].requires_grad_(True), target[keep][7:], weight[keep][7:]  # off the kinks
    for module in BOX_CASES:
        assert torch.autograd.gradgradcheck(lambda p: module(p, target, weight), (pred,)), module


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_select_kept_is_where(dtype):
    """The eager select (AND with an integer mask) equals ``where(keep, x, 0)`` bit for bit, NaN and inf too, for
    broadcast masks and strided views; its gradient is selected the same way, twice differentiable."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 10, generator=g, dtype=torch.float64).to(dtype)[:, ::2]
    x[0, 0], x[1, 1], x[2, 2] = float("nan"), float("inf"), -float("inf")
    bits = torch.int64 if dtype == torch.float64 else torch.uint8
    for shape in ((6, 1), (6, 5), (5,)):
        keep = torch.rand(shape, generator=g) < 0.5
        expected = torch.where(keep, x, torch.zeros((), dtype=dtype))
        got = NUMERICS_MODULE.select_kept(x, keep)
        assert got.dtype == dtype and got.shape == expected.shape
        assert torch.equal(got.view(bits), expected.view(bits))
    leaf = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    keep = torch.tensor([True, False, True, True, False]).unsqueeze(1)
    assert torch.autograd.gradgradcheck(lambda t: NUMERICS_MODULE.select_kept(t, keep) ** 3, (leaf,))
    (grad,) = torch.autograd.grad(NUMERICS_MODULE.select_kept(leaf, keep).sum(), leaf)
    assert torch.equal(grad, keep.expand(5, 3).to(torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1.0, -1.0, 0.5])
def test_exp_scaled_is_exp_in_place(dtype, scale):
    """``exp(scale x)`` through ``exp2`` on CPU, in place: relative error within ``(|scale x| + 2) ulp`` of the
    float64 exp, exact 0 / 1 / inf at -inf / 0 / +inf, NaN kept; over- and underflow where exp does."""
    x = torch.cat([torch.linspace(-110.0, 90.0, 20001, dtype=torch.float64), torch.tensor([0.0, -1e-30, 1e-30])])
    x = x.to(dtype)
    expected = torch.exp(scale * x.double())
    y = x.clone()
    got = NUMERICS_MODULE.exp_scaled_(y, scale)
    assert got.data_ptr() == y.data_ptr()
    ulp = torch.finfo(dtype).eps
    normal = expected.to(dtype).abs() >= torch.finfo(dtype).tiny
    finite = torch.isfinite(expected.to(dtype))
    relative = ((got.double() - expected) / expected).abs()
    bound = (scale * x.double()).abs().add(2.0).mul(ulp)
    assert (relative[normal & finite] <= bound[normal & finite]).all()
    assert torch.equal(torch.isinf(got), torch.isinf(expected.to(dtype)))
    specials = torch.tensor([-float("inf"), 0.0, float("inf"), float("nan")], dtype=dtype)
    got = NUMERICS_MODULE.exp_scaled_(specials.clone(), scale)
    expected = torch.exp(scale * specials)
    assert torch.equal(got[:3], expected[:3]) and got[3].isnan()


@pytest.mark.parametrize(
    "module", [FocalLoss(), QualityFocalLoss(), L1Loss(), MSELoss()], ids=lambda m: type(m).__name__
)
def test_torch_func_transforms_take_the_autograd_formulation(module):
    """torch.func rejects autograd.Functions without ``setup_context`` and cannot see through a bitcast: under a
    transform the eager fast paths step aside and ``torch.func.grad`` equals the eager gradient."""
    kind = "qfl" if isinstance(module, QualityFocalLoss) else "focal"
    if isinstance(module, (L1Loss, MSELoss)):
        pred, target, weight, _ = _regression_inputs("rows", seed=6)
        pred, target = torch.nan_to_num(pred), torch.nan_to_num(target, posinf=0.0)
    else:
        pred, target, weight = _inputs(kind, "rows", seed=6)
    weight = weight.detach()
    pred = pred.detach().requires_grad_(True)
    (expected,) = torch.autograd.grad(module(pred, target, weight), pred)
    got = torch.func.grad(lambda p: module(p, target, weight))(pred.detach())
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


CE_CASES = [
    dict(),
    dict(class_weight=[0.5, 1.0, 2.0, 1.5, 0.7], ignore_index=2, avg_non_ignore=True),
]


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("spatial", [False, True], ids=["rows", "spatial"])
@pytest.mark.parametrize("cfg", CE_CASES, ids=["plain", "class_weight-ignore"])
def test_softmax_cross_entropy_fast_path_matches_autograd(cfg, spatial, reduction, monkeypatch):
    """Closed-form softmax CE gradient (softmax - one_hot, in place) against the autograd formulation: labels out
    of range and ignored, rows of weight 0 with NaN/inf logits, a trained weight, (N, C, H, W) logits."""
    from visdet_export.losses import CrossEntropyLoss

    module = CrossEntropyLoss(**cfg)
    g = torch.Generator().manual_seed(7)
    shape = (23, 5, 2, 3) if spatial else (23, 5)
    label_shape = (shape[0],) + shape[2:]
    pred = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    label = torch.randint(-1, 7, label_shape, generator=g)
    weight = torch.rand(label_shape, generator=g, dtype=torch.float64) + 0.1
    weight = torch.where(torch.rand(label_shape, generator=g, dtype=torch.float64) < 0.3, 0.0, weight)
    dead = (weight == 0).unsqueeze(1).expand(shape)
    pred = torch.where(dead & (torch.rand(shape, generator=g) < 0.5), float("nan"), pred)
    pred = torch.where(dead & torch.isfinite(pred), float("inf"), pred)
    _, gp, gw = _fast_path_matches_autograd("cross_entropy_loss", module, pred, label, weight, monkeypatch, reduction)
    assert (gp[dead] == 0).all() and (gp != 0).any() and (gw != 0).any()


@pytest.mark.parametrize("beta", [2.0, 1.5, 1.0, 0.0])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_quality_focal_on_labels_fast_path_matches_autograd(reduction, beta, monkeypatch):
    """QFL on (labels, scores) without dense targets (negatives' closed form everywhere, the label's element
    scattered in) against the autograd formulation on the dense targets: background labels, scores 0 and 1, rows
    of weight 0 with NaN/inf logits, a frozen and a trained weight (which takes the autograd formulation)."""
    owner = importlib.import_module("visdet_export.losses.gfocal_loss")
    module = QualityFocalLoss(beta=beta)
    g = torch.Generator().manual_seed(13)
    n, c = 31, 6
    pred = torch.randn(n, c, generator=g, dtype=torch.float64) * 4
    labels = torch.randint(0, c + 1, (n,), generator=g)
    scores = torch.rand(n, generator=g, dtype=torch.float64)
    scores[:2] = torch.tensor([0.0, 1.0], dtype=torch.float64)
    weight = torch.rand(n, generator=g, dtype=torch.float64) + 0.1
    weight[4:14:3] = 0.0
    dead = (weight == 0).unsqueeze(1).expand(n, c)
    pred = torch.where(dead & (torch.rand(n, c, generator=g) < 0.5), float("nan"), pred)
    pred = torch.where(dead & torch.isfinite(pred), -float("inf"), pred)
    closed_form_calls = []
    closed_form = owner._quality_focal_labels_eager
    monkeypatch.setattr(owner, "_quality_focal_labels_eager", lambda *a: closed_form_calls.append(1) or closed_form(*a))
    for trained in (False, True):
        closed_form_calls.clear()
        _, gp, *rest = _fast_path_matches_autograd(
            "gfocal_loss", module, pred, (labels, scores), weight, monkeypatch, reduction, trained
        )
        assert (gp[dead] == 0).all() and (gp != 0).any()
        assert closed_form_calls == ([] if trained else [1])
        if trained:
            assert (rest[0] != 0).any()


@pytest.mark.parametrize("trained", [True, False], ids=["trained_weight", "frozen_weight"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_distribution_focal_fast_path_matches_autograd(reduction, trained, monkeypatch):
    """Closed-form DFL gradient (softmax minus the two weighted bins, in place) against the autograd formulation:
    targets on a bin, between bins and at reg_max (both bins the last one), rows of weight 0 with NaN/inf logits
    and target; twice differentiable through the autograd formulation."""
    from visdet_export.losses import DistributionFocalLoss

    module = DistributionFocalLoss()
    g = torch.Generator().manual_seed(11)
    n, bins = 29, 8
    pred = torch.randn(n, bins, generator=g, dtype=torch.float64) * 3
    target = torch.rand(n, generator=g, dtype=torch.float64) * (bins - 1)
    target[:3] = torch.tensor([0.0, 3.0, bins - 1.0], dtype=torch.float64)
    weight = torch.rand(n, generator=g, dtype=torch.float64) + 0.1
    weight[3:12:2] = 0.0
    dead = (weight == 0).unsqueeze(1).expand(n, bins)
    pred = torch.where(dead & (torch.rand(n, bins, generator=g) < 0.5), float("nan"), pred)
    pred = torch.where(dead & torch.isfinite(pred), float("inf"), pred)
    target = torch.where(weight == 0, float("nan"), target)
    owner = importlib.import_module("visdet_export.losses.gfocal_loss")
    closed_form_calls = []
    closed_form = owner._distribution_focal_loss_eager
    monkeypatch.setattr(
        owner, "_distribution_focal_loss_eager", lambda *a: closed_form_calls.append(1) or closed_form(*a)
    )
    _, gp, *rest = _fast_path_matches_autograd(
        "gfocal_loss", module, pred, target, weight, monkeypatch, reduction, trained
    )
    assert (gp[dead] == 0).all() and (gp != 0).any()
    assert closed_form_calls == ([] if trained else [1])  # a trained weight takes the autograd formulation
    if trained:
        assert (rest[0] != 0).any()
    live = pred[:3].detach().clone().requires_grad_(True)
    assert torch.autograd.gradgradcheck(lambda p: module(p, target[:3], weight[:3]), (live,))


@pytest.mark.parametrize(
    "module, weight_shape",
    [
        (FocalLoss(), "rows"), (L1Loss(), "rows"), (MSELoss(), "rows"), (MSELoss(), "elements"),
        (SmoothL1Loss(0.3), "rows"),
    ],
    ids=["FocalLoss", "L1Loss", "MSELoss-rows", "MSELoss-elements", "SmoothL1Loss"],
)
def test_closed_form_backward_twice_with_retain_graph(module, weight_shape):
    """The closed-form backward scales its saved gradient in place only when the graph is not retained: a second
    backward through a retained graph sees the same gradient (constant factors of the derivative included)."""
    if not isinstance(module, FocalLoss):
        pred, target, weight, _ = _regression_inputs(weight_shape, seed=8)
        pred, target = torch.nan_to_num(pred), torch.nan_to_num(target, posinf=0.0)
    else:
        pred, target, weight = _inputs("focal", "rows", seed=8)
    pred = pred.detach().requires_grad_(True)
    value = module(pred, target, weight.detach())
    (first,) = torch.autograd.grad(value * 3.0, pred, retain_graph=True)
    (second,) = torch.autograd.grad(value * 3.0, pred)
    (fresh,) = torch.autograd.grad(module(pred, target, weight.detach()) * 3.0, pred)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(first, fresh, rtol=0, atol=0)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize(
    "cfg, labels",
    [
        (dict(use_sigmoid=True), "soft"),
        (dict(use_sigmoid=True, class_weight=[0.5, 2.0, 1.0, 3.0, 1.5]), "index"),
        (dict(use_sigmoid=True, ignore_index=2), "index"),
    ],
    ids=["soft-targets", "index-labels-pos_weight", "index-labels-ignore_2"],
)
def test_sigmoid_cross_entropy_fast_path_matches_autograd(cfg, labels, reduction, monkeypatch):
    """Closed-form sigmoid CE gradient, pos_weight included, outputs zeroed where weight is 0 (NaN/inf logits and
    targets there), against the autograd formulation; a trained weight takes the autograd formulation. Index
    labels: background, out of range, ignored, and labels on logits of +-120."""
    from visdet_export.losses import CrossEntropyLoss

    module = CrossEntropyLoss(**cfg)
    g = torch.Generator().manual_seed(9)
    pred = torch.randn(29, 5, generator=g, dtype=torch.float64) * 3
    pred[0, :3] = 0.0
    pred[1:3] = torch.tensor([-120.0, -30.0, 30.0, 60.0, 120.0])  # softplus's linear side, saturated sigmoids
    if labels == "soft":
        label = torch.rand(29, 5, generator=g, dtype=torch.float64)
        label[1, 1] = -1.0  # ignored
        weight = torch.where(torch.rand(29, 5, generator=g, dtype=torch.float64) < 0.3, 0.0, 1.0)
        dead = weight == 0
        label = torch.where(dead, float("nan"), label)
    else:
        label = torch.randint(-1, 7, (29,), generator=g)
        weight = torch.where(torch.rand(29, generator=g, dtype=torch.float64) < 0.3, 0.0, 0.5)
        label[1:4], weight[1:4] = torch.tensor([0, 4, 2]), 0.5  # labelled at -120 and 120; ignore_index 2
        dead = (weight == 0).unsqueeze(1).expand(29, 5)
    pred = torch.where(dead, float("inf"), pred)
    owner = "cross_entropy_loss"
    _, gp = _fast_path_matches_autograd(owner, module, pred, label, weight, monkeypatch, reduction, False)
    _, _, gw = _fast_path_matches_autograd(owner, module, pred, label, weight, monkeypatch, reduction)
    assert (gp[dead] == 0).all() and (gp != 0).any() and (gw != 0).any()


def test_scatter_class_values_is_the_compare_and_select():
    """The eager target construction equals the exported graphs' ``where(labels == arange(C), values, 0)``, labels
    outside [0, C) (negative, background C, beyond) and NaN values included."""
    g = torch.Generator().manual_seed(10)
    pred = torch.randn(40, 6, generator=g, dtype=torch.float64)
    labels = torch.randint(-2, 9, (40,), generator=g)
    values = torch.rand(40, generator=g, dtype=torch.float64)
    values[:5] = float("nan")
    expected = torch.where(labels.unsqueeze(1) == torch.arange(6), values.unsqueeze(1), 0.0)
    got = NUMERICS_MODULE.scatter_class_values(pred, labels, values)
    torch.testing.assert_close(got, expected, equal_nan=True, rtol=0, atol=0)
    assert ((labels < 0) | (labels >= 6)).any() and ((labels >= 0) & (labels < 6) & torch.isnan(values)).any()


def test_eager_clamp_and_extrema_match_the_autograd_formulation():
    """The eager clamp(min=) / maximum / minimum of the box IoU have the derivatives of the autograd formulation
    (TorchScript, export), at the bound (slope 1, ATen's up to torch 2.13, in every release) and at ties (halves)
    included, and are twice differentiable."""
    g = torch.Generator().manual_seed(11)
    a = torch.randn(64, generator=g, dtype=torch.float64)
    b = torch.randn(64, generator=g, dtype=torch.float64)
    b[:8] = a[:8]  # ties
    a[8:12] = 0.0  # at the clamp bound
    weights = torch.rand(64, generator=g, dtype=torch.float64)
    for name, fn in (
        ("clamp", lambda x, y, eager: NUMERICS_MODULE.clamp_min(x, 0.0, eager) * y),
        ("maximum", lambda x, y, eager: NUMERICS_MODULE.maximum(x, y, eager)),
        ("minimum", lambda x, y, eager: NUMERICS_MODULE.minimum(x, y, eager)),
    ):
        results = []
        for eager in (True, False):
            x, y = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
            value = fn(x, y, eager)
            results.append((value.detach(), *torch.autograd.grad((value * weights).sum(), (x, y))))
        for got, expected in zip(*results):
            torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=name)
        if name == "clamp":
            assert (results[0][1][8:12] == b[8:12] * weights[8:12]).all()  # the slope 1 at the bound
        x, y = a[12:].clone().requires_grad_(True), b[12:].clone().requires_grad_(True)  # gradgradcheck: off the kinks
        assert torch.autograd.gradgradcheck(lambda p, q: fn(p, q, True) ** 2, (x, y)), name
    assert (results[0][1][:8] == 0.5 * weights[:8]).all()  # minimum's tie halves


@pytest.mark.parametrize("runtime", ["eager", "script"])
def test_positive_part_has_slope_one_at_zero_in_every_torch_release(runtime):
    """``positive_part`` is ``max(x, 0)`` (NaN and infinities kept, with or without grad) with slope 1 at +-0 and 0
    below: the side of ``|x|`` that the softplus beside it pairs with. ``clamp(min=0)`` has slope 0 at 0 from torch
    2.14 on, which turned softplus's slope at a zero logit into -1/2 in the exported and compiled focal, QFL and
    sigmoid CE."""
    positive_part = NUMERICS_MODULE.positive_part
    fn = torch.jit.script(positive_part) if runtime == "script" else positive_part
    x = torch.tensor([0.0, -0.0, -1e-45, 1e-45, -2.0, 3.0, float("-inf"), float("inf"), float("nan")],
                     requires_grad=True)
    for _ in range(2):  # TorchScript: the profiling call, then the optimised graph
        value = fn(x)
        (grad,) = torch.autograd.grad(value.sum(), x)
        expected = torch.tensor([0.0, 0.0, 0.0, 1e-45, 0.0, 3.0, 0.0, float("inf"), float("nan")])
        torch.testing.assert_close(value.detach(), expected, rtol=0, atol=0, equal_nan=True)
        assert grad.tolist() == [1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0]
        with torch.no_grad():  # the clamp of graphs without a gradient
            torch.testing.assert_close(fn(x), expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize(("gamma", "alpha"), [(2.0, 0.25), (1.5, -1.0), (0.0, 0.5), (0.5, 1.0)])
def test_focal_on_labels_is_the_one_hot_formulation(gamma, alpha):
    """The label-column formulation (compile without gradient, TorchScript, ONNX) against the one-hot one it
    replaces: labels in [0, C], background C and an out-of-range label included; values, gradients, second order."""
    from visdet_export.losses.focal_loss import _focal_elementwise_binary, _focal_on_labels, class_targets

    g = torch.Generator().manual_seed(3)
    n, c = 41, 6
    pred = (torch.randn(n, c, generator=g, dtype=torch.float64) * 4).requires_grad_(True)
    labels = torch.randint(0, c + 1, (n,), generator=g)
    labels[:3] = torch.tensor([c, -1, c + 5])
    scale = torch.rand(n, c, generator=g, dtype=torch.float64) + 0.5
    got = _focal_on_labels(pred, labels, gamma, alpha)
    expected = _focal_elementwise_binary(pred, (labels.unsqueeze(1) == torch.arange(c)).double(), gamma, alpha)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    (grad,) = torch.autograd.grad((got * scale).sum(), pred)
    (expected_grad,) = torch.autograd.grad((expected * scale).sum(), pred)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-14)
    assert class_targets(pred, labels)[:3].sum() == 0  # the rows without a class stay all negatives in both
    assert torch.autograd.gradgradcheck(lambda p: _focal_on_labels(p, labels, gamma, alpha), (pred,), fast_mode=True)


@pytest.mark.parametrize("beta", [2.0, 1.5, 0.0])
def test_quality_focal_on_labels_is_the_dense_formulation(beta):
    """QFL's label-column formulation (TorchScript, ONNX, compile without gradient) against the dense targets it
    replaces: values, gradients for the logits and the scores, second order."""
    from visdet_export.losses.gfocal_loss import _quality_focal_elementwise, _quality_focal_on_labels, quality_targets

    g = torch.Generator().manual_seed(4)
    n, c = 43, 6
    pred = (torch.randn(n, c, generator=g, dtype=torch.float64) * 4).requires_grad_(True)
    scores = torch.rand(n, generator=g, dtype=torch.float64).requires_grad_(True)
    labels = torch.randint(0, c + 1, (n,), generator=g)
    labels[:3] = torch.tensor([c, -1, c + 5])
    scale = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    got = _quality_focal_on_labels(pred, labels, scores, beta)
    expected = _quality_focal_elementwise(pred, quality_targets(pred, labels, scores), beta, False).sum(dim=1)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    grads = torch.autograd.grad((got * scale).sum(), (pred, scores))
    expected_grads = torch.autograd.grad((expected * scale).sum(), (pred, scores))
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert torch.autograd.gradgradcheck(
        lambda p, s: _quality_focal_on_labels(p, labels, s, beta), (pred, scores), fast_mode=True
    )


def test_binary_cross_entropy_on_labels_is_the_one_hot_formulation():
    """Sigmoid CE's label-column formulation (TorchScript, ONNX, compile without gradient) against the one-hot one:
    bit for bit in value, and the same slope at x = 0 (1/2 - t, the convention of ``bce_with_logits``)."""
    from visdet_export.losses.cross_entropy_loss import (
        _binary_cross_entropy_on_labels,
        _masked_bce_with_logits,
        _one_hot,
    )

    g = torch.Generator().manual_seed(5)
    n, c = 47, 6
    pred = torch.randn(n, c, generator=g, dtype=torch.float64) * 30
    labels = torch.randint(0, c + 1, (n,), generator=g)
    labels[:3] = torch.tensor([c, -1, c + 5])
    pred[3:9] = 0.0  # the label's logit at 0 too
    pred.requires_grad_(True)
    scale = torch.rand(n, c, generator=g, dtype=torch.float64) + 0.5
    got = _binary_cross_entropy_on_labels(pred, labels)
    expected = _masked_bce_with_logits(pred, _one_hot(pred, labels), None, None, False)
    assert torch.equal(got, expected)
    (grad,) = torch.autograd.grad((got * scale).sum(), pred)
    (expected_grad,) = torch.autograd.grad((expected * scale).sum(), pred)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-14)
    assert torch.autograd.gradgradcheck(lambda p: _binary_cross_entropy_on_labels(p, labels), (pred,), fast_mode=True)


# every representative configuration with its input layout, and the other layouts of soft targets
INPUT_LAYOUTS = [(name, CONFIG_VARIANTS.get(name)) for name in representative_configs()] + [
    ("focal", "onehot"), ("qfl", "dense")]


@pytest.mark.parametrize(("name", "variant"), INPUT_LAYOUTS, ids=[f"{n}-{v}" for n, v in INPUT_LAYOUTS])
def test_every_float_input_gets_the_autograd_gradient(name, variant, monkeypatch):
    """Each floating-point input (box or regression targets, soft targets, QFL scores, soft labels, weights),
    trained alongside pred one at a time (a trained weight alone sends most losses to autograd), gets from eager,
    fast paths included, the gradient of the autograd formulation: a fast path that skipped an input's gradient
    would train it silently wrong (QFL's scores and sigmoid CE's soft targets got none until this test)."""
    loss = build_loss(representative_configs()[name])
    spec = spec_for(loss, variant)
    sample = {k: v.double() if v.is_floating_point() else v for k, v in spec.sample(loss, 23, seed=4).items()}
    trainable = [k for k, v in sample.items() if v.is_floating_point() and k not in ("pred", "avg_factor")]
    assert trainable  # a weight at least

    def value_and_grads(trained: str, fast: bool):
        inputs = {k: v.clone().requires_grad_(k in ("pred", trained)) for k, v in sample.items()}
        with monkeypatch.context() as patch:
            if not fast:
                for module in [NUMERICS_MODULE, *LOSS_MODULES]:
                    if hasattr(module, "eager_fast_path"):
                        patch.setattr(module, "eager_fast_path", lambda t: False)
            value = spec.call(loss, inputs)
        scale = torch.linspace(0.5, 2.0, value.numel(), dtype=value.dtype).view(value.shape)
        grads = torch.autograd.grad((value * scale).sum(), [inputs["pred"], inputs[trained]], allow_unused=True)
        return value.detach(), grads

    for trained in trainable:
        fast_value, fast_grads = value_and_grads(trained, True)
        value, grads = value_and_grads(trained, False)
        torch.testing.assert_close(fast_value, value, rtol=1e-10, atol=1e-12)
        assert fast_grads[0] is not None and grads[0] is not None
        # None on both sides where the formulation detaches an input by design (distillation's soft labels)
        assert (fast_grads[1] is None) == (grads[1] is None), trained
        for which, fast_grad, grad in zip(("pred", trained), fast_grads, grads):
            if grad is not None:
                torch.testing.assert_close(fast_grad, grad, rtol=1e-10, atol=1e-12, msg=f"{trained}: d/d {which}")


@pytest.mark.parametrize("weight_shape", ["rows", "elements"])
def test_focal_autograd_formulation_takes_the_eager_slope_at_zero_logits(weight_shape, monkeypatch):
    """Logits at exactly 0 (a head's zero-initialised output): the autograd formulation (compile, export, ONNX)
    differentiates |x| of log1p(exp(-|x|)) on its x >= 0 side, as bce_with_logits' step and the eager closed form
    do, so the two give the same gradient there (a BCE slope of 1/2 - t, not 3/2 - t)."""
    pred, target, weight = _inputs("focal", weight_shape, seed=2)
    pred = pred.detach().clone()
    pred[:6] = 0.0
    pred[6:9, :2] = 0.0
    _fast_path_matches_autograd(OWNERS["focal"], FocalLoss(gamma=2.0, alpha=0.25), pred, target, weight, monkeypatch,
                                "mean", False, avg_factor=7.0)


def _peak_tensor_bytes(step) -> int:
    """High-water mark of the CPU tensor bytes ``step`` allocates (the profiler's memory events, as the runner)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = prof.profiler.kineto_results.events() if prof.profiler is not None else []
    live = peak = 0
    for _, nbytes in sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"):
        live += nbytes
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize(("beta", "buffers"), [(0.0, 3), (1.5, 7.25), (2.0, 4)])
def test_eager_dense_qfl_peak_memory(beta: float, buffers: float) -> None:
    """Eager dense QFL fwd+bwd in (N, C) float32 buffers: the precise difference s (1 - t) - t (1 - s) needs
    sigmoid(-x) after the slope s (1 - s) is taken, which cost beta = 0 (no slope at all) and beta != 2 (sigmoid(-x)
    kept alive through the |u|^beta temporaries) one more buffer each (3 -> 4, 7.25 -> 8.25)."""
    n, c = 20000, 80
    torch.manual_seed(0)
    x = torch.empty(n, c).normal_().requires_grad_()
    t = torch.empty(n, c).uniform_()
    t.mul_(t < 0.02)
    loss = build_loss(dict(type="QualityFocalLoss", beta=beta))

    def step() -> None:
        loss(x, t).backward()
        x.grad = None

    step()
    assert _peak_tensor_bytes(step) <= (buffers + 0.1) * n * c * 4
