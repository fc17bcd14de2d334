"""Mean squared error, as visdet's ``MSELoss`` (centerness, keypoint heatmaps)."""


from typing import Optional

import torch
from torch import Tensor

from ..numerics import closed_form_path, closed_form_regression, masked_difference, regression_inputs
from ..reduction import AvgFactor, as_avg_factor, resolve_reduction, weight_reduce_loss
from .base import WeightedLoss, refuse_non_tensors


def mse_loss(
    pred: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    reduction: str = "mean",
    avg_factor: Optional[Tensor] = None,
) -> Tensor:
    """``(pred - target) ** 2`` element-wise.

    Args:
        pred (Tensor[*]), target (Tensor[*]).
        weight (Tensor[*] or Tensor[*][:-1], optional): weight 0 masks the element (NaN/inf included).

    Returns:
        Tensor[*] for "none", else Tensor[].
    """
    pred, target, weight = regression_inputs(pred, target, weight)
    if closed_form_path(pred, target):
        return weight_reduce_loss(_mse_closed_form(pred, target, weight), None, reduction, avg_factor)
    diff = masked_difference(pred, target, weight)
    return weight_reduce_loss(diff * diff, weight, reduction, avg_factor)


@torch.jit.unused
def _mse_closed_form(pred: Tensor, target: Tensor, weight: Optional[Tensor]) -> Tensor:
    return closed_form_regression(
        pred, target, weight, _mse_terms, torch.square, grad_scale=2.0, weighted_terms=_mse_weighted_terms
    )


def _mse_terms(diff: Tensor, with_grad: bool) -> tuple[Tensor, Optional[Tensor]]:
    if with_grad:
        return diff * diff, diff  # the derivative is 2 diff: the factor 2 joins the upstream gradient
    return diff.mul_(diff), None


def _mse_weighted_terms(diff: Tensor, weight: Tensor, with_grad: bool) -> tuple[Tensor, Optional[Tensor]]:
    # diff * weight is the weighted derivative (over 2) and, times diff, the weighted value
    weighted = diff * weight
    return diff.mul_(weighted), weighted if with_grad else None


class MSELoss(WeightedLoss):
    """MSE loss module; see :func:`mse_loss`."""

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
        return self.weighted(mse_loss(pred, target, weight, reduction, as_avg_factor(avg_factor, pred)))
