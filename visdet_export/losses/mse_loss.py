"""Mean squared error, as visdet's ``MSELoss`` (centerness, keypoint heatmaps)."""


from typing import Optional

from torch import Tensor

from ..numerics import regression_difference
from ..reduction import AvgFactor, as_avg_factor, resolve_reduction, weight_reduce_loss
from .base import WeightedLoss


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
    diff, weight = regression_difference(pred, target, weight)
    return weight_reduce_loss(diff * diff, weight, reduction, avg_factor)


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
        reduction = resolve_reduction(self.reduction, reduction_override)
        return self.loss_weight * mse_loss(pred, target, weight, reduction, as_avg_factor(avg_factor, pred))
