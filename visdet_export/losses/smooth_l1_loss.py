"""L1 and smooth L1 (Huber) losses for box regression (Faster R-CNN, RetinaNet).

Reference: Girshick, "Fast R-CNN", https://arxiv.org/abs/1504.08083. Semantics follow visdet / MMDetection 3.x
``smooth_l1_loss.py``, without its early return on all-zero weights (a branch on tensor data that also returns
a scalar where "none" promises the element-wise shape).
"""


from typing import Optional

import torch
from torch import Tensor

from ..numerics import closed_form_path, closed_form_regression, masked_difference, regression_inputs, static
from ..reduction import AvgFactor, as_avg_factor, resolve_reduction, weight_reduce_loss
from ..validation import check_divisor
from .base import WeightedLoss, refuse_misplaced_reduction, refuse_non_tensors


def l1_loss(
    pred: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    reduction: str = "mean",
    avg_factor: Optional[Tensor] = None,
) -> Tensor:
    """``|pred - target|`` element-wise.

    Args:
        pred (Tensor[*]), target (Tensor[*]).
        weight (Tensor[*] or Tensor[*][:-1], optional): weight 0 masks the element (NaN/inf included).

    Returns:
        Tensor[*] for "none", else Tensor[].
    """
    pred, target, weight = regression_inputs(pred, target, weight)
    if closed_form_path(pred, target):
        return weight_reduce_loss(_l1_closed_form(pred, target, weight), None, reduction, avg_factor)
    return weight_reduce_loss(masked_difference(pred, target, weight).abs(), weight, reduction, avg_factor)


@torch.jit.unused
def _l1_closed_form(pred: Tensor, target: Tensor, weight: Optional[Tensor]) -> Tensor:
    return closed_form_regression(pred, target, weight, _l1_terms, torch.abs)


def _l1_terms(diff: Tensor, with_grad: bool) -> tuple[Tensor, Optional[Tensor]]:
    grad = diff.sign() if with_grad else None
    return diff.abs_(), grad


def smooth_l1_loss(
    pred: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    beta: float = 1.0,
    reduction: str = "mean",
    avg_factor: Optional[Tensor] = None,
) -> Tensor:
    r"""Smooth L1: :math:`0.5 d^2 / \beta` for :math:`d < \beta`, else :math:`d - 0.5\beta`, :math:`d = |p - t|`.

    Args: as :func:`l1_loss`; ``beta`` > 0.
    """
    if not torch.jit.is_scripting():
        refuse_misplaced_reduction("smooth_l1_loss", {"beta": beta})
    pred, target, weight = regression_inputs(pred, target, weight)
    if closed_form_path(pred, target):
        return weight_reduce_loss(_smooth_l1_closed_form(pred, target, weight, beta), None, reduction, avg_factor)
    return weight_reduce_loss(_smooth_l1(masked_difference(pred, target, weight), beta), weight, reduction, avg_factor)


def _smooth_l1(diff: Tensor, beta: float) -> Tensor:
    distance = diff.abs()
    # With m = min(d, beta): (m / beta) (d - m / 2) is each branch on its side and has each branch's slope, with no
    # select (a scalar loop in eager CPU, 7x a multiplication) and, at beta = 1, three operations over the boxes
    # after the clamp where 0.5 m^2 / beta + (d - m) took four (one pass less in onnxruntime); m / beta <= 1 cannot
    # overflow.
    inlier = distance.clamp(max=beta)
    fraction = inlier if beta == 1.0 else inlier / beta
    return fraction * (distance - 0.5 * inlier)


@torch.jit.unused
def _smooth_l1_closed_form(pred: Tensor, target: Tensor, weight: Optional[Tensor], beta: float) -> Tensor:
    def terms(diff: Tensor, with_grad: bool) -> tuple[Tensor, Optional[Tensor]]:
        sign = diff.sign() if with_grad else None
        distance = diff.abs_()
        inlier = distance.clamp(max=beta)
        grad = None if sign is None else sign.mul_(inlier)  # d / beta inside, sign(d) outside, with grad_scale
        return distance.sub_(inlier).addcmul_(inlier, inlier, value=0.5 / beta), grad

    return closed_form_regression(pred, target, weight, terms, lambda diff: _smooth_l1(diff, beta), 1.0 / beta)


class L1Loss(WeightedLoss):
    """L1 loss module; see :func:`l1_loss`."""

    def forward(
        self,
        pred: Tensor,
        target: Tensor,
        weight: Optional[Tensor] = None,
        avg_factor: AvgFactor = None,
        reduction_override: Optional[str] = None,
    ) -> Tensor:
        """``pred`` and ``target`` of one shape (box deltas (N, 4), or any); ``weight`` of that shape (1 on some axes)
        or one value per row. Returns the loss times ``loss_weight``: 0-d, or ``pred``'s shape under "none"."""
        if not torch.jit.is_scripting():
            refuse_non_tensors(self, pred, {"target": target}, weight)
        reduction = resolve_reduction(self.reduction, reduction_override)
        return self.weighted(l1_loss(pred, target, weight, reduction, as_avg_factor(avg_factor, pred)))


class SmoothL1Loss(WeightedLoss):
    """Smooth L1 loss module; see :func:`smooth_l1_loss`.

    Args:
        beta: threshold between the quadratic and linear parts, > 0.
    """

    beta: float

    def __init__(self, beta: float = 1.0, reduction: str = "mean", loss_weight: float = 1.0) -> None:
        super().__init__(reduction, loss_weight)
        self.beta = check_divisor("beta", beta)

    def forward(
        self,
        pred: Tensor,
        target: Tensor,
        weight: Optional[Tensor] = None,
        avg_factor: AvgFactor = None,
        reduction_override: Optional[str] = None,
    ) -> Tensor:
        """``pred`` and ``target`` of one shape (box deltas (N, 4), or any); ``weight`` of that shape (1 on some axes)
        or one value per row. Returns the loss times ``loss_weight``: 0-d, or ``pred``'s shape under "none"."""
        if not torch.jit.is_scripting():
            refuse_non_tensors(self, pred, {"target": target}, weight)
        reduction = resolve_reduction(self.reduction, reduction_override)
        loss = smooth_l1_loss(pred, target, weight, static(self.beta), reduction, as_avg_factor(avg_factor, pred))
        return self.weighted(loss)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, " + super().extra_repr()
