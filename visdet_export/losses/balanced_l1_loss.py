"""Balanced L1 loss (Libra R-CNN).

Reference: Pang et al., "Libra R-CNN: Towards Balanced Learning for Object Detection",
https://arxiv.org/abs/1904.02701. Semantics follow visdet / MMDetection 3.x ``balanced_l1_loss.py``.
"""


import math
from typing import Optional

import torch
from torch import Tensor

from ..numerics import regression_difference
from ..reduction import AvgFactor, as_avg_factor, resolve_reduction, weight_reduce_loss
from ..validation import ConfigError, check_float
from .base import WeightedLoss


def balanced_l1_loss(
    pred: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    alpha: float = 0.5,
    gamma: float = 1.5,
    beta: float = 1.0,
    reduction: str = "mean",
    avg_factor: Optional[Tensor] = None,
) -> Tensor:
    r"""Balanced L1, with :math:`b = e^{\gamma/\alpha} - 1` and :math:`d = |p - t|`:

    .. math::
        L = \begin{cases} \frac{\alpha}{b}(b d + 1)\log(\frac{b d}{\beta} + 1) - \alpha d & d < \beta \\
        \gamma d + \frac{\gamma}{b} - \alpha\beta & \text{otherwise} \end{cases}

    Args: as :func:`~visdet_export.losses.smooth_l1_loss.l1_loss`.
    """
    diff, weight = regression_difference(pred, target, weight)
    diff = diff.abs()
    b = math.exp(gamma / alpha) - 1.0
    loss = torch.where(
        diff < beta,
        alpha / b * (b * diff + 1.0) * torch.log1p(b * diff / beta) - alpha * diff,
        gamma * diff + gamma / b - alpha * beta,
    )
    return weight_reduce_loss(loss, weight, reduction, avg_factor)


class BalancedL1Loss(WeightedLoss):
    """Balanced L1 loss module; see :func:`balanced_l1_loss`.

    Args:
        alpha: > 0, controls the gradient of inliers.
        gamma: > 0, bounds the regression error.
        beta: > 0, threshold between the two parts.
    """

    alpha: float
    gamma: float
    beta: float

    def __init__(
        self,
        alpha: float = 0.5,
        gamma: float = 1.5,
        beta: float = 1.0,
        reduction: str = "mean",
        loss_weight: float = 1.0,
    ) -> None:
        super().__init__(reduction, loss_weight)
        self.alpha = check_float("alpha", alpha, minimum=0.0, min_inclusive=False)
        self.gamma = check_float("gamma", gamma, minimum=0.0, min_inclusive=False)
        self.beta = check_float("beta", beta, minimum=0.0, min_inclusive=False)
        if self.gamma / self.alpha > 80.0:
            raise ConfigError(f"gamma / alpha = {self.gamma / self.alpha} overflows exp() in float32; keep it <= 80")

    def forward(
        self,
        pred: Tensor,
        target: Tensor,
        weight: Optional[Tensor] = None,
        avg_factor: AvgFactor = None,
        reduction_override: Optional[str] = None,
    ) -> Tensor:
        reduction = resolve_reduction(self.reduction, reduction_override)
        loss = balanced_l1_loss(
            pred, target, weight, self.alpha, self.gamma, self.beta, reduction, as_avg_factor(avg_factor, pred)
        )
        return self.loss_weight * loss

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}, beta={self.beta}, " + super().extra_repr()
