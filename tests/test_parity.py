"""Eager parity of every loss with the independent float64 reference (``tests/reference.py``).

One table of cases (configuration x input layout) drives every test: values and gradients w.r.t. ``pred`` over
every reduction (configured or overridden), with and without ``weight``, ``avg_factor`` as None / Python number /
0-d tensor, and ``loss_weight``; float64 gradcheck / gradgradcheck; module == functional; non-contiguous and
expanded inputs.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

import pytest
import torch
from reference import (
    SEED_LOSS_NAMES,
    boxes,
    grad_of,
    overlapping_boxes,
    reference_loss,
    strided,
)
from torch import Tensor

from visdet_export import build_loss
from visdet_export.losses import (
    balanced_l1_loss,
    binary_cross_entropy,
    distribution_focal_loss,
    giou_loss,
    iou_loss,
    l1_loss,
    mask_cross_entropy,
    mse_loss,
    quality_focal_loss,
    sigmoid_focal_loss,
    smooth_l1_loss,
    softmax_cross_entropy,
)
from visdet_export.specs import CONFIG_VARIANTS, SEED_CONFIGS, SampleOptions, representative_configs, spec_for

F64 = torch.float64
TOL = dict(rtol=1e-9, atol=1e-12)
N = 12

Inputs = dict  # keys: pred, target (Tensor or (labels, scores)), weight (or RoI labels in mask mode), avg_factor


def _spec_inputs(cfg: dict, variant: Optional[str], n: int, seed: int) -> Inputs:
    """Draw float64 inputs with the loss's input spec and map them onto forward's argument names."""
    loss = build_loss(cfg)
    spec = spec_for(loss, variant)
    drawn = spec.sample(loss, n, seed=seed, options=SampleOptions(dtype=F64))
    if "labels" in drawn and "scores" in drawn:
        target = (drawn["labels"], drawn["scores"])
    else:
        target = drawn["target"]
    weight = drawn.get("label", drawn.get("weight"))  # mask mode: the RoI labels are the third argument
    return dict(pred=drawn["pred"], target=target, weight=weight, avg_factor=drawn["avg_factor"])


def _with_zero_logits(inputs: Inputs) -> Inputs:
    """Put a few logits at exactly 0 (a kink of |x| inside the stable sigmoid/BCE forms)."""
    pred = inputs["pred"].clone()
    pred.view(-1)[:: max(1, pred.numel() // 5)] = 0.0
    return {**inputs, "pred": pred}


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _weights(shape: tuple[int, ...], seed: int) -> Tensor:
    g = _generator(seed)
    w = torch.rand(shape, generator=g, dtype=F64) + 0.1
    return torch.where(torch.rand(shape, generator=g, dtype=F64) < 0.2, 0.0, w)


@dataclass(frozen=True)
class Case:
    """One configured loss and how its inputs are drawn."""

    id: str
    cfg: dict
    make: Callable[[int], Inputs] = field(repr=False)
    has_weight: bool = True  # mask mode: the third argument is the RoI labels, not a weight
    logits: bool = True  # pred are logits (zero logits are mixed in)


def spec_case(case_id: str, cfg: dict, variant: Optional[str] = None, *, n: int = N, logits: bool = True,
              edit: Optional[Callable[[Inputs, int], Inputs]] = None, has_weight: bool = True) -> Case:
    def make(seed: int) -> Inputs:
        inputs = _spec_inputs(cfg, variant, n, seed)
        if logits:
            inputs = _with_zero_logits(inputs)
        if edit is not None:
            inputs = edit(inputs, seed)
        return inputs

    return Case(case_id, cfg, make, has_weight, logits)


# --- input edits for layouts the specs do not draw ---------------------------------------------------------------


def _focal_weight_nc(inputs: Inputs, seed: int) -> Inputs:
    return {**inputs, "weight": _weights(tuple(inputs["pred"].shape), seed + 100)}


def _focal_weight_flat(inputs: Inputs, seed: int) -> Inputs:
    return {**inputs, "weight": _weights((inputs["pred"].numel(),), seed + 100)}


def _odd_ce_labels(ignore_index: int, num_classes: int) -> Callable[[Inputs, int], Inputs]:
    """Labels that include ignore_index, -100 / -1 (out of range unless ignored) and C + 3."""

    def edit(inputs: Inputs, seed: int) -> Inputs:
        labels = inputs["target"].clone()
        labels[0] = ignore_index
        labels[1] = -100 if ignore_index != -100 else -1
        labels[2] = num_classes + 3
        labels[3] = num_classes - 1
        labels[4] = num_classes  # background for sigmoid, out of range for softmax
        return {**inputs, "target": labels}

    return edit


def _ce_sigmoid_same_shape(inputs: Inputs, seed: int) -> Inputs:
    """Soft (N, C) targets in [0, 1] with some elements labelled -100 (ignored)."""
    g = _generator(seed + 7)
    pred = inputs["pred"]
    soft = torch.rand(pred.shape, generator=g, dtype=F64)
    soft = torch.where(torch.rand(pred.shape, generator=g) < 0.1, -100.0, soft)
    return {**inputs, "target": soft, "weight": _weights(tuple(pred.shape), seed + 9)}


def _ce_spatial(seed: int) -> Inputs:
    g = _generator(seed)
    pred = torch.randn(3, 5, 4, 6, generator=g, dtype=F64) * 2
    labels = torch.randint(0, 5, (3, 4, 6), generator=g)
    labels[0, 0] = -100
    weight = _weights((3, 4, 6), seed + 1)
    return dict(pred=pred, target=labels, weight=weight, avg_factor=torch.tensor(50.0, dtype=F64))


def _unnormalised_probabilities(inputs: Inputs, seed: int) -> Inputs:
    """Class-probability targets used as given: rows summing to anything in [0, C), one row all 0."""
    target = torch.rand(inputs["pred"].shape, generator=_generator(seed + 11), dtype=F64)
    target[0] = 0.0
    return {**inputs, "target": target}


def _ce_spatial_probabilities(seed: int) -> Inputs:
    """(N, C, H, W) logits with class probabilities of their shape and (N, H, W) weights."""
    g = _generator(seed)
    pred = torch.randn(3, 5, 4, 6, generator=g, dtype=F64) * 2
    target = torch.softmax(torch.randn(3, 5, 4, 6, generator=g, dtype=F64) * 3, dim=1)
    avg_factor = torch.tensor(50.0, dtype=F64)
    return dict(pred=pred, target=target, weight=_weights((3, 4, 6), seed + 1), avg_factor=avg_factor)


def _mask_inputs(num_classes: int) -> Callable[[int], Inputs]:
    """Small mask-mode inputs: logits (3, C, 6, 7), binary targets (3, 6, 7), RoI labels (3,)."""

    def make(seed: int) -> Inputs:
        g = _generator(seed)
        pred = torch.randn(3, num_classes, 6, 7, generator=g, dtype=F64) * 2
        pred[0, :, 0, :3] = 0.0
        target = (torch.rand(3, 6, 7, generator=g) > 0.5).to(F64)
        labels = torch.tensor([num_classes - 1, 0, 1]) if num_classes > 1 else torch.zeros(3, dtype=torch.long)
        return dict(pred=pred, target=target, weight=labels, avg_factor=torch.tensor(60.5, dtype=F64))

    return make


def _dfl_edges(inputs: Inputs, seed: int) -> Inputs:
    reg_max = inputs["pred"].size(1) - 1
    target = inputs["target"].clone()
    mid = 7.3 if reg_max > 8 else reg_max - 0.7
    target[:5] = torch.tensor([0.0, mid, reg_max - 1e-6, float(reg_max), 3.0], dtype=F64)
    return {**inputs, "target": target}


def _qfl_edges(inputs: Inputs, seed: int) -> Inputs:
    labels, scores = inputs["target"]
    labels, scores = labels.clone(), scores.clone()
    c = inputs["pred"].size(1)
    labels[:4] = torch.tensor([0, c, 5, c - 1])
    scores[:4] = torch.tensor([0.0, 0.7, 1.0, 0.5], dtype=F64)
    return {**inputs, "target": (labels, scores)}


def _row_weight(inputs: Inputs, seed: int) -> Inputs:
    return {**inputs, "weight": _weights((inputs["pred"].size(0),), seed + 3)}


def _box_weight_n4(inputs: Inputs, seed: int) -> Inputs:
    return {**inputs, "weight": _weights((inputs["pred"].size(0), 4), seed + 3)}


def _boxes_mixed(inputs: Inputs, seed: int) -> Inputs:
    """Boxes that overlap, are disjoint, or contain each other."""
    target = boxes(N, seed)
    pred = overlapping_boxes(target, seed + 1, jitter=0.3)
    pred[0] = target[0] + torch.tensor([200.0, 200.0, 200.0, 200.0], dtype=F64)  # disjoint
    pred[1] = torch.cat([target[1, :2] + 0.5, target[1, 2:] - 0.5])  # inside
    return {**inputs, "pred": pred, "target": target}


NUM_CLASSES = 80


def _cases() -> list[Case]:
    cases = [
        spec_case(
            name,
            cfg,
            CONFIG_VARIANTS.get(name),
            logits=not (cfg["type"] in ("L1Loss", "SmoothL1Loss", "MSELoss", "BalancedL1Loss", "IoULoss", "GIoULoss")
                        or cfg.get("activated", False)),
            edit=_boxes_mixed if cfg["type"] in ("IoULoss", "GIoULoss") else None,
            has_weight=not cfg.get("use_mask", False),
        )
        for name, cfg in representative_configs().items()
        if cfg["type"] in SEED_LOSS_NAMES and not cfg.get("use_mask", False)
    ]
    focal = SEED_CONFIGS["focal"]
    cases += [
        spec_case("focal_onehot", focal, "onehot"),
        spec_case("focal_weight_NC", focal, edit=_focal_weight_nc),
        spec_case("focal_weight_flat", focal, edit=_focal_weight_flat),
        spec_case("focal_gamma0.5_alpha-1", dict(type="FocalLoss", gamma=0.5, alpha=-1), edit=_focal_weight_nc),
        spec_case("focal_gamma0_alpha0.75", dict(type="FocalLoss", gamma=0.0, alpha=0.75)),
        spec_case("focal_activated_onehot", dict(type="FocalLoss", activated=True), "onehot", logits=False),
        spec_case("qfl_dense", SEED_CONFIGS["qfl"], "dense"),
        spec_case("qfl_pair_edges", dict(type="QualityFocalLoss", beta=1.5), edit=_qfl_edges),
        spec_case("qfl_activated_dense", dict(type="QualityFocalLoss", activated=True), "dense", logits=False),
        spec_case("dfl_edges", SEED_CONFIGS["dfl"], edit=_dfl_edges),
        spec_case("dfl_reg_max7", dict(type="DistributionFocalLoss", reg_max=7), edit=_dfl_edges),
        spec_case("ce_softmax_ignore-1", dict(type="CrossEntropyLoss", ignore_index=-1),
                  edit=_odd_ce_labels(-1, NUM_CLASSES)),
        spec_case("ce_softmax_ignore255_avg_non_ignore",
                  dict(type="CrossEntropyLoss", ignore_index=255, avg_non_ignore=True),
                  edit=_odd_ce_labels(255, NUM_CLASSES)),
        spec_case("ce_softmax_class_weight", dict(type="CrossEntropyLoss", class_weight=[0.5, 2.0, 1.0, 0.0] * 20),
                  edit=_odd_ce_labels(-100, NUM_CLASSES)),
        Case("ce_softmax_spatial", dict(type="CrossEntropyLoss", avg_non_ignore=True), _ce_spatial),
        spec_case("ce_softmax_probabilities_unnormalised", dict(type="CrossEntropyLoss", loss_weight=2.0),
                  "probabilities", edit=_unnormalised_probabilities),
        Case("ce_softmax_probabilities_spatial",
             dict(type="CrossEntropyLoss", class_weight=[0.5, 2.0, 1.0, 0.0, 3.0]), _ce_spatial_probabilities),
        spec_case("ce_sigmoid_labels_class_weight",
                  dict(type="CrossEntropyLoss", use_sigmoid=True, class_weight=[0.5, 2.0, 1.5, 1.0] * 20),
                  "labels", edit=_odd_ce_labels(-100, NUM_CLASSES)),
        spec_case("ce_sigmoid_labels_ignore255", dict(type="CrossEntropyLoss", use_sigmoid=True, ignore_index=255),
                  "labels", edit=_odd_ce_labels(255, NUM_CLASSES)),
        spec_case("ce_sigmoid_soft_NC", dict(type="CrossEntropyLoss", use_sigmoid=True, avg_non_ignore=True),
                  "labels", edit=_ce_sigmoid_same_shape),
        Case("ce_mask", dict(type="CrossEntropyLoss", use_mask=True), _mask_inputs(5), has_weight=False),
        Case("ce_mask_class_weight", dict(type="CrossEntropyLoss", use_mask=True, class_weight=[1.0, 3.0, 0.5, 2.0]),
             _mask_inputs(4), has_weight=False),
        spec_case("smooth_l1_beta0.5", dict(type="SmoothL1Loss", beta=0.5), logits=False),
        spec_case("smooth_l1_row_weight", SEED_CONFIGS["smooth_l1"], logits=False, edit=_row_weight),
        spec_case("l1_row_weight", SEED_CONFIGS["l1"], logits=False, edit=_row_weight),
        spec_case("mse_row_weight", SEED_CONFIGS["mse"], logits=False, edit=_row_weight),
        spec_case("balanced_l1_custom", dict(type="BalancedL1Loss", alpha=0.3, gamma=1.0, beta=0.8), logits=False),
        spec_case("iou_log_eps1e-2_weight_N4", dict(type="IoULoss", mode="log", eps=1e-2), logits=False,
                  edit=lambda i, s: _box_weight_n4(_boxes_mixed(i, s), s)),
        spec_case("iou_square_weight_N4", dict(type="IoULoss", mode="square"), logits=False,
                  edit=lambda i, s: _box_weight_n4(_boxes_mixed(i, s), s)),
        spec_case("giou_eps1e-3_weight_N4", dict(type="GIoULoss", eps=1e-3), logits=False,
                  edit=lambda i, s: _box_weight_n4(_boxes_mixed(i, s), s)),
    ]
    return cases


CASES = _cases()
CASE_BY_ID = {case.id: case for case in CASES}
assert len(CASE_BY_ID) == len(CASES), "case ids must be unique"

AVG_FACTORS = ("no_avg", "avg_number", "avg_tensor")
REDUCTIONS = ("none", "mean", "sum")
OTHER_REDUCTION = {"none": "sum", "mean": "none", "sum": "mean"}


def _matrix() -> list:
    params = []
    for case in CASES:
        for weighted in ((True, False) if case.has_weight else (False,)):
            for avg in AVG_FACTORS:
                wid = "weight" if weighted else "no_weight"
                params.append(pytest.param(case.id, weighted, avg, id=f"{case.id}-{wid}-{avg}"))
    return params


@functools.lru_cache(maxsize=None)
def case_inputs(case_id: str, seed: int = 0) -> Inputs:
    """The drawn inputs of a case (cached; callers clone before requiring grad and never write into them)."""
    return CASE_BY_ID[case_id].make(seed)


def _call_args(inputs: Inputs, case: Case, weighted: bool, avg: str) -> tuple:
    weight = inputs["weight"] if (weighted or not case.has_weight) else None
    factor = inputs["avg_factor"]
    avg_factor = None if avg == "no_avg" else (float(factor) if avg == "avg_number" else factor)
    return weight, avg_factor


def _build(case: Case, reduction: str, how: str) -> tuple[torch.nn.Module, dict, Optional[str]]:
    """``configured``: reduction in the config, the case's loss_weight; ``override``: another configured
    reduction, ``reduction_override`` and loss_weight 0.5."""
    cfg = copy.deepcopy(case.cfg)
    if how == "configured":
        cfg["reduction"] = reduction
        return build_loss(cfg), cfg, None
    cfg["reduction"] = OTHER_REDUCTION[reduction]
    cfg["loss_weight"] = 0.5
    return build_loss(cfg), cfg, reduction


@pytest.mark.parametrize(("case_id", "weighted", "avg"), _matrix())
def test_matches_reference(case_id: str, weighted: bool, avg: str) -> None:
    """Values and gradients for every reduction, set in the config or overridden per call (loss_weight 0.5)."""
    case = CASE_BY_ID[case_id]
    inputs = case_inputs(case_id)
    weight, avg_factor = _call_args(inputs, case, weighted, avg)
    for reduction in REDUCTIONS:
        for how in ("configured", "override"):
            where = f"reduction={reduction} ({how})"
            loss, cfg, override = _build(case, reduction, how)
            if reduction == "sum" and avg_factor is not None:
                with pytest.raises(ValueError, match="avg_factor"):
                    loss(inputs["pred"], inputs["target"], weight, avg_factor, override)
                continue

            pred = inputs["pred"].clone().requires_grad_()
            ref_pred = inputs["pred"].clone().requires_grad_()
            out = loss(pred, inputs["target"], weight, avg_factor, override)
            expected = reference_loss(cfg, ref_pred, inputs["target"], weight, avg_factor, override)

            assert out.dtype == F64, where
            assert out.shape == expected.shape, where
            assert reduction == "none" or out.dim() == 0, where
            torch.testing.assert_close(out, expected, **TOL, msg=lambda m: f"{where}: {m}")

            grad_output = torch.rand(out.shape, generator=_generator(5), dtype=F64) + 0.5  # not 1
            torch.testing.assert_close(
                grad_of(out, pred, grad_output), grad_of(expected, ref_pred, grad_output), **TOL,
                msg=lambda m: f"{where}, grad: {m}",
            )


def test_reference_is_not_trivial() -> None:
    """Guard against a parity test that cannot fail: the reference reacts to each option it is given."""
    inputs = CASE_BY_ID["focal"].make(0)
    base = reference_loss(dict(type="FocalLoss"), inputs["pred"], inputs["target"])
    for changed in (dict(gamma=1.0), dict(alpha=0.5), dict(loss_weight=2.0), dict(reduction="sum")):
        other = reference_loss(dict(type="FocalLoss", **changed), inputs["pred"], inputs["target"])
        assert not torch.allclose(base, other), changed
    assert not torch.allclose(
        base, reference_loss(dict(type="FocalLoss"), inputs["pred"], inputs["target"], inputs["weight"])
    )


def test_seed_listing_snippet() -> None:
    from visdet_export.registry import MODELS

    names = [n for n in sorted(MODELS.module_dict) if "Loss" in n]
    assert set(SEED_LOSS_NAMES) <= set(names), sorted(set(SEED_LOSS_NAMES) - set(names))
    for name in SEED_LOSS_NAMES:
        assert MODELS.get(name).__name__ == name


@pytest.mark.parametrize("name", sorted(SEED_CONFIGS))
def test_seed_recipe_builds_and_matches(name: str) -> None:
    """Every loss block of the seed page builds as written and matches the reference at its defaults."""
    cfg = SEED_CONFIGS[name]
    loss = build_loss(cfg)
    inputs = _spec_inputs(cfg, CONFIG_VARIANTS.get(name), N, seed=3)
    pred = inputs["pred"].clone().requires_grad_()
    ref_pred = inputs["pred"].clone().requires_grad_()
    out = loss(pred, inputs["target"], inputs["weight"], inputs["avg_factor"])
    expected = reference_loss(cfg, ref_pred, inputs["target"], inputs["weight"], inputs["avg_factor"])
    torch.testing.assert_close(out, expected, **TOL)
    torch.testing.assert_close(grad_of(out, pred), grad_of(expected, ref_pred), **TOL)
    assert float(out.detach()) > 0


@pytest.mark.parametrize("ignore_index", [-1, 5, 255])
@pytest.mark.parametrize("use_sigmoid", [False, True], ids=["softmax", "sigmoid"])
def test_ce_per_call_ignore_index(use_sigmoid: bool, ignore_index: int) -> None:
    cfg = dict(type="CrossEntropyLoss", use_sigmoid=use_sigmoid, avg_non_ignore=True)
    loss = build_loss(cfg)
    g = _generator(1)
    pred = torch.randn(10, 6, generator=g, dtype=F64)
    labels = torch.randint(0, 6, (10,), generator=g)
    labels[:3] = torch.tensor([ignore_index, 2, 3])
    out = loss(pred, labels, ignore_index=ignore_index)
    expected = reference_loss(cfg, pred, labels, ignore_index=ignore_index)
    torch.testing.assert_close(out, expected, **TOL)
    if use_sigmoid and ignore_index < 0:
        return  # negative labels are masked in sigmoid mode whatever ignore_index is
    # the per-call index really replaces the configured one
    assert not torch.allclose(out, loss(pred, labels))


# --- gradcheck ------------------------------------------------------------------------------------------------

GRADCHECK_CASES = [
    "focal", "focal_onehot", "focal_weight_NC", "focal_gamma0.5_alpha-1", "focal_activated", "qfl", "qfl_dense",
    "qfl_activated", "dfl", "dfl_reg_max7", "ce_softmax", "ce_class_weight", "ce_softmax_spatial",
    "ce_softmax_probabilities", "ce_softmax_probabilities_unnormalised", "ce_softmax_probabilities_spatial",
    "ce_sigmoid_centerness", "ce_sigmoid_labels_class_weight", "ce_sigmoid_soft_NC", "ce_mask_class_weight", "l1",
    "smooth_l1", "smooth_l1_beta0.5", "mse", "balanced_l1", "balanced_l1_custom", "iou_log", "iou_linear",
    "iou_square", "giou",
]
# Twice differentiable at interior points (L1's second derivative is 0 there, still checked).
GRADGRAD_CASES = [c for c in GRADCHECK_CASES if c not in ("focal_gamma0.5_alpha-1",)]


def _interior(case: Case, seed: int = 0) -> Inputs:
    """Inputs away from every kink: no zero logits, |d| != beta, boxes overlapping far from the clamps."""
    inputs = case_inputs(case.id, seed)
    loss_type = case.cfg["type"]
    if loss_type in ("IoULoss", "GIoULoss"):
        target = boxes(4, seed)
        inputs = {**inputs, "pred": overlapping_boxes(target, seed + 1), "target": target}
    if case.logits:
        pred = inputs["pred"]
        inputs = {**inputs, "pred": torch.where(pred.abs() < 0.05, 0.3, pred)}
    if loss_type in ("SmoothL1Loss", "BalancedL1Loss"):
        beta = float(case.cfg.get("beta", 1.0))
        diff = (inputs["pred"] - inputs["target"]).abs()
        near = (diff - beta).abs() < 1e-3
        inputs = {**inputs, "pred": torch.where(near, inputs["pred"] + 0.01, inputs["pred"])}
    return inputs


def _small(inputs: Inputs, n: int) -> Inputs:
    """The first ``n`` samples (RoIs in mask mode) of every per-sample input."""
    classes = inputs["pred"].size(1) if inputs["pred"].dim() > 1 else 1

    def cut(name: str, x):
        if isinstance(x, tuple):
            return tuple(cut(name, t) for t in x)
        if x is None or x.dim() == 0:
            return x
        pred = inputs["pred"]
        if name == "weight" and x.dim() == 1 and x.numel() == pred.numel() and x.numel() != pred.size(0):
            return x[: n * classes]  # focal's flattened (N * C,) weight
        return x[:n]

    return {k: cut(k, v) for k, v in inputs.items()}


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("case_id", GRADCHECK_CASES)
def test_gradcheck(case_id: str, reduction: str) -> None:
    case = CASE_BY_ID[case_id]
    inputs = _small(_interior(case), 3)
    loss = build_loss({**case.cfg, "reduction": reduction})
    avg = inputs["avg_factor"] if reduction == "mean" else None

    def fn(pred: Tensor) -> Tensor:
        return loss(pred, inputs["target"], inputs["weight"], avg)

    pred = inputs["pred"].clone().requires_grad_()
    assert torch.autograd.gradcheck(fn, (pred,), fast_mode=True)


@pytest.mark.parametrize("case_id", GRADGRAD_CASES)
def test_gradgradcheck(case_id: str) -> None:
    case = CASE_BY_ID[case_id]
    inputs = _small(_interior(case), 2)
    loss = build_loss({**case.cfg, "reduction": "sum"})

    def fn(pred: Tensor) -> Tensor:
        return loss(pred, inputs["target"], inputs["weight"])

    pred = inputs["pred"].clone().requires_grad_()
    assert torch.autograd.gradgradcheck(fn, (pred,), fast_mode=True)


def _trained(inputs: Inputs, case: Case) -> tuple[dict[str, Tensor], Callable[[dict[str, Tensor]], tuple]]:
    """The floating inputs a model could train with the loss (predictions, soft targets, scores, weights; weights
    kept away from 0, where masking takes over) as leaves, and a function rebuilding the call's arguments from them."""
    target = inputs["target"]
    leaves = {"pred": inputs["pred"]}
    if isinstance(target, tuple):
        leaves["scores"] = target[1]
    elif target.is_floating_point():
        leaves["target"] = target
    if case.has_weight and inputs["weight"] is not None:
        leaves["weight"] = inputs["weight"].abs() + 0.25
    leaves = {name: value.detach().clone().requires_grad_() for name, value in leaves.items()}

    def arguments(trained: dict[str, Tensor]) -> tuple:
        call_target = (target[0], trained["scores"]) if "scores" in trained else trained.get("target", target)
        return trained["pred"], call_target, trained.get("weight", inputs["weight"]), inputs["avg_factor"]

    return leaves, arguments


@pytest.mark.parametrize("case_id", GRADCHECK_CASES)
def test_gradients_of_trained_targets_and_weights(case_id: str) -> None:
    """Soft targets, quality scores and weights trained with the model (distillation, learned weights) get the
    reference's gradients, and ``gradcheck`` passes with respect to all of them at once. (A weight of exactly 0
    masks its element: the weight's gradient there is the loss of the masked inputs, NaN-safe.)"""
    case = CASE_BY_ID[case_id]
    inputs = _small(_interior(case), 4)
    loss = build_loss(case.cfg)
    leaves, arguments = _trained(inputs, case)
    assert len(leaves) > 1, "a case with nothing but pred to train checks nothing new"
    reference_leaves = {name: value.detach().clone().requires_grad_() for name, value in leaves.items()}
    out = loss(*arguments(leaves))
    expected = reference_loss(case.cfg, *arguments(reference_leaves))
    torch.testing.assert_close(out, expected, **TOL)
    got = torch.autograd.grad(out, list(leaves.values()))
    want = torch.autograd.grad(expected, list(reference_leaves.values()), allow_unused=True)
    for name, g, w in zip(leaves, got, want):
        w = torch.zeros_like(g) if w is None else w
        if name == "target" and case.cfg["type"] in ("QualityFocalLoss", "DistributionFocalLoss"):
            # where the reference's indexing, not the loss, decides: QFL's dense scores of exactly 0 are its
            # negatives, which get no gradient (gradcheck below covers them); DFL's targets at reg_max step to a bin
            # past the last one, where the derivative from inside [0, reg_max] is ours (test_edge_cases)
            t = leaves["target"].detach()
            beside = (t == 0) if case.cfg["type"] == "QualityFocalLoss" else (t == inputs["pred"].size(1) - 1)
            g, w = g.where(~beside, 0.0), w.where(~beside, 0.0)
        torch.testing.assert_close(g, w, **TOL, msg=lambda m: f"{name}: {m}")
    names = list(leaves)
    if case.cfg["type"] == "DistributionFocalLoss":
        # a numerical derivative at exactly 0 or reg_max steps outside [0, reg_max], where the loss is NaN
        reg_max = inputs["pred"].size(1) - 1
        leaves["target"] = leaves["target"].detach().clamp(1e-3, reg_max - 1e-3).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda *xs: loss(*arguments(dict(zip(names, xs)))), tuple(leaves.values()), fast_mode=True
    )


# --- module == functional ------------------------------------------------------------------------------------


def _functional(cfg: dict, inputs: Inputs, reduction: str) -> Tensor:
    """The pure function a module wraps, called directly (times loss_weight)."""
    loss = build_loss(cfg)
    avg = inputs["avg_factor"]
    pred, target, weight = inputs["pred"], inputs["target"], inputs["weight"]
    t = cfg["type"]
    if t == "FocalLoss":
        out = sigmoid_focal_loss(pred, target, weight, loss.gamma, loss.alpha, reduction, avg, loss.activated)
    elif t == "QualityFocalLoss":
        out = quality_focal_loss(pred, target, weight, loss.beta, reduction, avg, loss.activated)
    elif t == "DistributionFocalLoss":
        out = distribution_focal_loss(pred, target, weight, reduction, avg)
    elif t == "CrossEntropyLoss" and loss.use_mask:
        out = mask_cross_entropy(pred, target, weight, loss.class_weight, reduction, avg)
    elif t == "CrossEntropyLoss":
        fn = binary_cross_entropy if loss.use_sigmoid else softmax_cross_entropy
        out = fn(pred, target, weight, loss.class_weight, loss.ignore_index, loss.avg_non_ignore, reduction, avg)
    elif t == "L1Loss":
        out = l1_loss(pred, target, weight, reduction, avg)
    elif t == "MSELoss":
        out = mse_loss(pred, target, weight, reduction, avg)
    elif t == "SmoothL1Loss":
        out = smooth_l1_loss(pred, target, weight, loss.beta, reduction, avg)
    elif t == "BalancedL1Loss":
        out = balanced_l1_loss(pred, target, weight, loss.alpha, loss.gamma, loss.beta, reduction, avg)
    elif t == "IoULoss":
        out = iou_loss(pred, target, weight, loss.mode, loss.eps, reduction, avg)
    elif t == "GIoULoss":
        out = giou_loss(pred, target, weight, loss.eps, reduction, avg)
    else:
        raise KeyError(t)
    return loss.loss_weight * out


MODULE_FUNCTIONAL_CASES = [
    "focal", "focal_activated", "qfl_dense", "qfl_activated_dense", "dfl", "ce_softmax", "ce_class_weight",
    "ce_sigmoid_centerness", "ce_sigmoid_labels", "ce_mask", "ce_mask_class_weight", "l1", "smooth_l1", "mse",
    "balanced_l1", "iou_log", "iou_linear", "iou_square", "giou",
]


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("case_id", MODULE_FUNCTIONAL_CASES)
def test_module_equals_functional(case_id: str, reduction: str) -> None:
    case = CASE_BY_ID[case_id]
    inputs = case_inputs(case.id, 2)
    cfg = {**case.cfg, "reduction": reduction}
    module_out = build_loss(cfg)(inputs["pred"], inputs["target"], inputs["weight"], inputs["avg_factor"])
    torch.testing.assert_close(module_out, _functional(cfg, inputs, reduction), rtol=0, atol=0)


# --- memory layout -----------------------------------------------------------------------------------------------


LAYOUT_CASES = [c.id for c in CASES if c.id in MODULE_FUNCTIONAL_CASES or c.id in ("focal_weight_NC", "qfl",
                                                                                       "ce_softmax_spatial")]


@pytest.mark.parametrize("case_id", LAYOUT_CASES)
def test_non_contiguous_inputs(case_id: str) -> None:
    case = CASE_BY_ID[case_id]
    inputs = case_inputs(case.id, 4)
    loss = build_loss({**case.cfg, "reduction": "none"})
    pred = inputs["pred"].clone().requires_grad_()
    out = loss(pred, inputs["target"], inputs["weight"])
    grad = grad_of(out, pred, torch.ones_like(out) * 3.0)

    pred_nc = strided(inputs["pred"].clone()).requires_grad_()
    out_nc = loss(pred_nc, strided(inputs["target"]), strided(inputs["weight"]))
    torch.testing.assert_close(out_nc, out, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(grad_of(out_nc, pred_nc, torch.ones_like(out) * 3.0), grad, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("case_id", ["focal", "focal_onehot", "qfl_dense", "ce_softmax", "ce_sigmoid_labels",
                                     "dfl", "l1", "smooth_l1", "mse", "balanced_l1", "iou_log", "giou"])
def test_expanded_inputs(case_id: str) -> None:
    """A pred row broadcast with expand() and an expanded scalar weight equal their materialized copies."""
    case = CASE_BY_ID[case_id]
    inputs = case_inputs(case.id, 6)
    loss = build_loss({**case.cfg, "reduction": "mean"})
    n = inputs["pred"].size(0)
    row = inputs["pred"][:1].clone()
    weight_value = torch.tensor(0.7, dtype=F64)
    weight_shape = inputs["weight"].shape

    row_e = row.clone().requires_grad_()
    out_e = loss(row_e.expand(n, *row.shape[1:]), inputs["target"], weight_value.expand(weight_shape))
    row_m = row.clone().requires_grad_()
    out_m = loss(row_m.repeat(n, *([1] * (row.dim() - 1))), inputs["target"],
                 weight_value.repeat(*weight_shape) if len(weight_shape) else weight_value)
    torch.testing.assert_close(out_e, out_m, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(grad_of(out_e, row_e), grad_of(out_m, row_m), rtol=1e-13, atol=1e-15)
