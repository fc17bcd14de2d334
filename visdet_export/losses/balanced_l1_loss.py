"""Balanced L1 loss (Libra R-CNN).

Reference: Pang et al., "Libra R-CNN: Towards Balanced Learning for Object Detection",
https://arxiv.org/abs/1904.02701. Semantics follow visdet / MMDetection 3.x ``balanced_l1_loss.py``.
"""


import math
from typing import Optional

import torch
from torch import Tensor

from ..numerics import (
    closed_form_path,
    closed_form_regression,
    masked_difference,
    needs_grad,
    regression_inputs,
    static,
)
from ..reduction import AvgFactor, as_avg_factor, resolve_reduction, weight_reduce_loss
from ..validation import FLOAT32_MAX, FLOAT32_TINY, ConfigError, check_divisor, check_float
from .base import WeightedLoss, refuse_misplaced_reduction, refuse_non_tensors


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
    if not torch.jit.is_scripting():
        refuse_misplaced_reduction("balanced_l1_loss", {"alpha": alpha, "gamma": gamma, "beta": beta})
    pred, target, weight = regression_inputs(pred, target, weight)
    if closed_form_path(pred, target):
        loss = _balanced_l1_closed_form(pred, target, weight, alpha, gamma, beta)
        return weight_reduce_loss(loss, None, reduction, avg_factor)
    loss = _balanced_l1(masked_difference(pred, target, weight), alpha, gamma, beta)
    return weight_reduce_loss(loss, weight, reduction, avg_factor)


def _balanced_l1(diff: Tensor, alpha: float, gamma: float, beta: float) -> Tensor:
    distance = diff.abs()
    b = math.exp(gamma / alpha) - 1.0
    # The inner branch at m = min(d, beta) plus gamma (d - m): b = e^(gamma/alpha) - 1 makes the inner branch at beta
    # gamma beta + gamma / b - alpha beta, so this is the outer branch beyond beta with its slope gamma, and the
    # inner one below. Where a gradient flows, a select gives m the slope 1 at beta (the inner branch's there, as the
    # closed form's) in every torch release (see numerics.bounded_below).
    inlier = torch.where(distance > beta, beta, distance) if needs_grad(distance) else distance.clamp(max=beta)
    inner = alpha / b * (b * inlier + 1.0) * torch.log1p(b * inlier / beta) - alpha * inlier
    return inner + gamma * (distance - inlier)


@torch.jit.unused
def _balanced_l1_closed_form(
    pred: Tensor, target: Tensor, weight: Optional[Tensor], alpha: float, gamma: float, beta: float
) -> Tensor:
    def terms(diff: Tensor, with_grad: bool) -> tuple[Tensor, Optional[Tensor]]:
        # computed here, inside numerics' autograd Function under torch.compile: a float computed outside and
        # read inside is symbolic there, which Dynamo fails to lift when a second loss traces the Function
        b = math.exp(gamma / alpha) - 1.0
        sign = diff.sign() if with_grad else None
        distance = diff.abs_()
        inlier = distance.clamp(max=beta)
        log_term = inlier.mul(b / beta).log1p_()
        scaled = inlier.mul(b).add_(1.0)  # b m + 1
        outer = distance.sub(inlier).mul_(gamma).sub_(inlier, alpha=alpha)  # gamma (d - m) - alpha m
        value = outer.addcmul_(scaled, log_term, value=alpha / b)
        if sign is None:
            return value, None
        # d/dd = [d <= beta] (alpha (log1p(b m / beta) + (b m + 1) / (b m + beta) - 1) - gamma) + gamma
        # b m + beta formed directly: (b m + 1) + (beta - 1) cancels for a small beta (7.5e-4 at beta = 1e-4)
        inner_slope = log_term.add_(scaled.div_(inlier.mul(b).add_(beta))).sub_(1.0 + gamma / alpha).mul_(alpha)
        inside = (distance <= beta).to(distance.dtype)
        return value, inner_slope.mul_(inside).add_(gamma).mul_(sign)

    return closed_form_regression(
        pred, target, weight, terms, lambda diff: _balanced_l1(diff, alpha, gamma, beta)
    )


def _check_scale(alpha: float, gamma: float, beta: float) -> None:
    """``b = e^(gamma / alpha) - 1`` scales the distances d up to ``beta``: refuse the settings where b rounds to 0
    (the loss divides by it) or where a product of the formulations leaves float32 for some d <= beta: ``(b d + 1)
    log(1 + b d / beta)`` (up to ``(b beta + 1) log(1 + b)``), ``b / beta`` and, in TorchScript's chain rule of
    ``b d / beta``, ``alpha / (b beta)``."""
    ratio = gamma / alpha
    if ratio > 80.0:
        raise ConfigError(f"gamma / alpha = {ratio} overflows exp() in float32; keep it <= 80")
    b = math.exp(ratio) - 1.0
    if b < FLOAT32_TINY:
        raise ConfigError(
            f"gamma / alpha = {ratio} is too small: b = exp(gamma / alpha) - 1 = {b} (the loss divides by b) is not a "
            "normal float32; keep gamma / alpha >= 1e-15"
        )
    low = max(b / FLOAT32_MAX, alpha / (b * FLOAT32_MAX), FLOAT32_TINY)
    high = FLOAT32_MAX / (b * max(math.log1p(b), 1.0))
    if not low <= beta <= high:
        raise ConfigError(
            f"beta={beta} is out of range for gamma / alpha = {ratio}: b = exp(gamma / alpha) - 1 = {b:.4g} scales "
            f"the distances below beta, and the products of the loss must be finite in float32; keep beta within "
            f"[{low:.4g}, {high:.4g}]"
        )


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
        self.beta = check_divisor("beta", beta)
        _check_scale(self.alpha, self.gamma, self.beta)

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
        loss = balanced_l1_loss(
            pred,
            target,
            weight,
            static(self.alpha),
            static(self.gamma),
            static(self.beta),
            reduction,
            as_avg_factor(avg_factor, pred),
        )
        return self.weighted(loss)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}, beta={self.beta}, " + super().extra_repr()
