"""L1 and smooth L1 (Huber) losses for box regression (Faster R-CNN, RetinaNet).

Reference: Girshick, "Fast R-CNN", https://arxiv.org/abs/1504.08083. Semantics follow visdet / MMDetection 3.x
``smooth_l1_loss.py``, without its early return on all-zero weights (a branch on tensor data that also returns
a scalar where "none" promises the element-wise shape).
"""


from typing import Optional

import torch
from torch import Tensor

from ..numerics import regression_difference
from ..reduction import AvgFactor, as_avg_factor, resolve_reduction, weight_reduce_loss
from ..validation import check_float
from .base import WeightedLoss


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
    diff, weight = regression_difference(pred, target, weight)
    return weight_reduce_loss(diff.abs(), weight, reduction, avg_factor)


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
    diff, weight = regression_difference(pred, target, weight)
    diff = diff.abs()
    quadratic = diff < beta
    # The quadratic branch sees only its own elements, so a tiny beta cannot overflow it into inf * 0 gradients.
    small = torch.where(quadratic, diff, 0.0)
    loss = torch.where(quadratic, 0.5 * small * small / beta, diff - 0.5 * beta)
    return weight_reduce_loss(loss, weight, reduction, avg_factor)


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
        reduction = resolve_reduction(self.reduction, reduction_override)
        return self.loss_weight * l1_loss(pred, target, weight, reduction, as_avg_factor(avg_factor, pred))


class SmoothL1Loss(WeightedLoss):
    """Smooth L1 loss module; see :func:`smooth_l1_loss`.

    Args:
        beta: threshold between the quadratic and linear parts, > 0.
    """

    beta: float

    def __init__(self, beta: float = 1.0, reduction: str = "mean", loss_weight: float = 1.0) -> None:
        super().__init__(reduction, loss_weight)
        self.beta = check_float("beta", beta, minimum=0.0, min_inclusive=False)

    def forward(
        self,
        pred: Tensor,
        target: Tensor,
        weight: Optional[Tensor] = None,
        avg_factor: AvgFactor = None,
        reduction_override: Optional[str] = None,
    ) -> Tensor:
        reduction = resolve_reduction(self.reduction, reduction_override)
        loss = smooth_l1_loss(pred, target, weight, self.beta, reduction, as_avg_factor(avg_factor, pred))
        return self.loss_weight * loss

    def extra_repr(self) -> str:
        return f"beta={self.beta}, " + super().extra_repr()
