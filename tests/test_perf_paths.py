"""The eager fast paths (closed-form focal / QFL gradients, masked regression difference) against the autograd
formulation that compile, TorchScript and export run: same values, same gradients, a trained ``weight``
included (the closed-form path once returned no gradient for it), NaN-safe where weight is 0."""

import importlib

import pytest
import torch

from visdet_export.losses import FocalLoss, QualityFocalLoss, sigmoid_focal_loss

FOCAL_MODULE = importlib.import_module("visdet_export.losses.focal_loss")
GFOCAL_MODULE = importlib.import_module("visdet_export.losses.gfocal_loss")


def _inputs(kind: str, weight_shape: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n, c = 37, 5
    pred = (torch.randn(n, c, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    if kind == "focal":
        target = torch.randint(0, c + 1, (n,), generator=g)
    else:
        labels = torch.randint(0, c + 1, (n,), generator=g)
        target = torch.where(labels.unsqueeze(1) == torch.arange(c), torch.rand(n, 1, generator=g, dtype=torch.float64), 0.0)
    shape = (n,) if weight_shape == "rows" else (n, c)
    weight = torch.rand(shape, generator=g, dtype=torch.float64) + 0.1
    weight = torch.where(torch.rand(shape, generator=g, dtype=torch.float64) < 0.3, 0.0, weight)
    return pred, target, weight.requires_grad_(True)


def _value_and_grads(module, loss_type, pred, target, weight, fast: bool, monkeypatch, reduction="mean"):
    owner = FOCAL_MODULE if loss_type == "focal" else GFOCAL_MODULE
    with monkeypatch.context() as patch:
        if not fast:
            patch.setattr(owner, "eager_fast_path", lambda tensor: False)
        pred = pred.detach().clone().requires_grad_(True)
        weight = weight.detach().clone().requires_grad_(True)
        value = module(pred, target, weight, avg_factor=7.0, reduction_override=reduction)
        out = value if reduction != "none" else (value * torch.linspace(0.5, 2.0, value.numel(), dtype=value.dtype).view(value.shape)).sum()
        gp, gw = torch.autograd.grad(out, (pred, weight))
    return value.detach(), gp, gw


CASES = [
    ("focal", FocalLoss(gamma=2.0, alpha=0.25), "rows"),
    ("focal", FocalLoss(gamma=2.0, alpha=0.25), "elements"),
    ("focal", FocalLoss(gamma=1.5, alpha=-1.0), "elements"),
    ("qfl", QualityFocalLoss(beta=2.0), "rows"),
    ("qfl", QualityFocalLoss(beta=1.5), "rows"),
]


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("loss_type, module, weight_shape", CASES, ids=[f"{c[0]}-{c[2]}-{i}" for i, c in enumerate(CASES)])
def test_fast_path_matches_autograd_including_weight_gradient(loss_type, module, weight_shape, reduction, monkeypatch):
    pred, target, weight = _inputs(loss_type, weight_shape)
    fast = _value_and_grads(module, loss_type, pred, target, weight, True, monkeypatch, reduction)
    slow = _value_and_grads(module, loss_type, pred, target, weight, False, monkeypatch, reduction)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert fast[2].abs().sum() > 0  # the weight does get a gradient


@pytest.mark.parametrize("loss_type, module", [("focal", FocalLoss()), ("qfl", QualityFocalLoss())])
def test_fast_path_matches_torchscript(loss_type, module, monkeypatch):
    pred, target, weight = _inputs(loss_type, "rows", seed=1)
    scripted = torch.jit.script(module)
    eager = _value_and_grads(module, loss_type, pred, target, weight, True, monkeypatch)
    p = pred.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    value = scripted(p, target, w, 7.0)
    gp, gw = torch.autograd.grad(value, (p, w))
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
    for fast in (True, False):
        value, gp, gw = _value_and_grads(module, loss_type, pred, target, weight, fast, monkeypatch)
        assert torch.isfinite(value) and torch.isfinite(gp).all() and torch.isfinite(gw).all()
        assert (gp[masked] == 0).all()
