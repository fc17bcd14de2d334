"""Knowledge-distillation losses: soft-label KL divergence (KD) and localization distillation (LD).

References: Hinton et al., "Distilling the Knowledge in a Neural Network", https://arxiv.org/abs/1503.02531;
Zheng et al., "Localization Distillation for Dense Object Detection", https://arxiv.org/abs/2102.12252.
Semantics follow MMDetection 3.x ``kd_loss.py`` (``knowledge_distillation_kl_div_loss`` and
``KnowledgeDistillationKLDivLoss``) and the way ``LDHead`` applies it to the DFL box distributions.

Teacher outputs are ordinary inputs (``soft_label``), so a student + teacher + loss graph can be exported or
composed like any other loss.
"""


import math
from typing import Optional

import torch
from torch import Tensor

from ..numerics import (
    check_class_axis,
    logits_compute_dtype,
    row_weighted_inputs,
    same_shape,
    same_size,
    static,
    weight_keep_mask,
    zero_where_unweighted,
)
from ..reduction import AvgFactor, as_avg_factor, resolve_reduction, weight_reduce_loss
from ..validation import FLOAT32_MAX, check_divisor, check_int
from .base import WeightedLoss, refuse_misplaced_reduction, refuse_non_tensors


def _checked_temperature(T: object) -> float:
    """``T`` > 0 within float32 both ways: the logits are divided by it and the loss is scaled by T^2."""
    return check_divisor(
        "T", T, maximum=math.sqrt(FLOAT32_MAX),
        why="the logits are divided by T and the loss is scaled by T * T, both in float32",
    )


def soft_label_kl_div(pred: Tensor, soft_label: Tensor, T: float, detach_target: bool = True) -> Tensor:
    r"""Temperature-scaled KL divergence from the teacher's to the student's softmax, averaged over the last axis.

    .. math::
        \mathrm{KD} = \frac{T^2}{C} \sum_c p_c (\log p_c - \log q_c), \quad
        p = \mathrm{softmax}(t / T), \; q = \mathrm{softmax}(s / T)

    Both logs come from ``log_softmax`` and ``p = exp(log p)``, so a teacher probability that underflows to 0
    contributes exactly ``0 * finite = 0`` (MMDetection's ``F.kl_div`` convention ``0 log 0 = 0``) and no log of 0
    is ever taken, in the value or in either gradient. A teacher logit of -inf (a class masked out) makes
    ``log p`` -inf: its class contributes 0 too, as in ``F.kl_div``, and so does a student masked there as well
    (``-inf - -inf`` would be NaN); a student logit of -inf where the teacher's probability is not 0 gives +inf.
    In float32 the value is off by up to about ``4 * 2**-24 * T**2 / C * (max |log p| + max |log q|)`` per row
    (README, Mixed precision): a student close to its teacher keeps few digits, as with ``F.kl_div``.

    Args:
        pred (Tensor[*, C]): student logits (compute dtype).
        soft_label (Tensor[*, C]): teacher logits (compute dtype).
        T: temperature, > 0.
        detach_target: stop the gradient to ``soft_label`` (MMDetection's default).

    Returns:
        Tensor[*]: the loss of each row.
    """
    log_target = torch.log_softmax(soft_label / T, dim=-1)
    if detach_target:
        log_target = log_target.detach()
    log_pred = torch.log_softmax(pred / T, dim=-1)
    target = torch.exp(log_target)
    kl = torch.where(target == 0, 0.0, target * (log_target - log_pred))
    # mean over the classes as MMDetection's ``.mean(1)``; the class count is static, so this is no frozen ``numel``
    return kl.mean(dim=-1) * (T * T)


def knowledge_distillation_kl_div_loss(
    pred: Tensor,
    soft_label: Tensor,
    weight: Optional[Tensor] = None,
    T: float = 10.0,
    reduction: str = "mean",
    avg_factor: Optional[Tensor] = None,
    detach_target: bool = True,
) -> Tensor:
    r"""Knowledge-distillation KL loss between student and teacher logits (MMDetection ``kd_loss``).

    .. math::
        \mathrm{KD}_i = \frac{T^2}{C} \sum_c p_{ic} (\log p_{ic} - \log q_{ic}), \quad
        p_i = \mathrm{softmax}(t_i / T), \; q_i = \mathrm{softmax}(s_i / T)

    Note the mean (not the sum) over the ``C`` classes, exactly as MMDetection's
    ``F.kl_div(..., reduction='none').mean(1) * (T * T)``.

    Args:
        pred (Tensor[N, C]): student logits.
        soft_label (Tensor[N, C]): teacher logits (the target; its gradient is stopped when ``detach_target``).
        weight (Tensor[N], optional): per-row weight; weight 0 masks the row, NaN/inf inputs there included.
        T: temperature, > 0 (MMDetection requires an integer >= 1; any positive number works here).
        avg_factor (Tensor[], optional): denominator of the mean.

    Returns:
        Tensor[N] for "none", else Tensor[].

    Example:
        >>> pred = torch.randn(6, 5, requires_grad=True)
        >>> loss = knowledge_distillation_kl_div_loss(pred, torch.randn(6, 5), T=2.0)
        >>> loss.backward()
    """
    if not torch.jit.is_scripting():
        refuse_misplaced_reduction("knowledge_distillation_kl_div_loss", {"T": T})
    if pred.dim() != 2 or not same_shape(soft_label, pred):
        raise ValueError(
            "expected pred (N, C) and soft_label of the same shape, got "
            + str(pred.shape) + " and " + str(soft_label.shape)
        )
    check_class_axis(pred, 1, "KnowledgeDistillationKLDivLoss")
    pred, soft_label, weight, _ = row_weighted_inputs(pred, soft_label, weight)
    loss = soft_label_kl_div(pred, soft_label, T, detach_target)
    return weight_reduce_loss(loss, weight, reduction, avg_factor)


class KnowledgeDistillationKLDivLoss(WeightedLoss):
    """Knowledge-distillation KL loss module; see :func:`knowledge_distillation_kl_div_loss`.

    ``forward(pred, soft_label, weight=None, avg_factor=None, reduction_override=None)`` with student logits
    ``pred`` (N, C) and teacher logits ``soft_label`` (N, C). The teacher's gradient is stopped.

    Args:
        reduction, loss_weight: see :mod:`visdet_export.reduction`.
        T: temperature, > 0 (default 10 as in MMDetection).
    """

    T: float

    def __init__(self, reduction: str = "mean", loss_weight: float = 1.0, T: float = 10.0) -> None:
        super().__init__(reduction, loss_weight)
        self.T = _checked_temperature(T)

    def forward(
        self,
        pred: Tensor,
        soft_label: Tensor,
        weight: Optional[Tensor] = None,
        avg_factor: AvgFactor = None,
        reduction_override: Optional[str] = None,
    ) -> Tensor:
        """``pred`` (N, C) student logits, ``soft_label`` (N, C) teacher logits (no gradient); ``weight`` (N,).
        Returns the loss times ``loss_weight``: 0-d, or (N,) under "none"."""
        if not torch.jit.is_scripting():
            refuse_non_tensors(self, pred, {"soft_label": soft_label}, weight)
        reduction = resolve_reduction(self.reduction, reduction_override)
        loss = knowledge_distillation_kl_div_loss(
            pred, soft_label, weight, static(self.T), reduction, as_avg_factor(avg_factor, pred)
        )
        return self.weighted(loss)

    def extra_repr(self) -> str:
        return f"T={self.T}, " + super().extra_repr()


def localization_distillation_loss(
    pred: Tensor,
    soft_label: Tensor,
    weight: Optional[Tensor] = None,
    T: float = 10.0,
    reg_max: int = 16,
    reduction: str = "mean",
    avg_factor: Optional[Tensor] = None,
    detach_target: bool = True,
) -> Tensor:
    r"""Localization distillation: the KD loss between student and teacher DFL box distributions, per side.

    Each box row holds four distributions (left, top, right, bottom) of ``reg_max + 1`` bins, as a GFL head's
    ``bbox_pred`` does. Each side gets the soft-label KL of :func:`soft_label_kl_div` (mean over the bins, times
    :math:`T^2`), which is what MMDetection's ``LDHead`` computes by reshaping both to ``(N * 4, reg_max + 1)`` and
    calling ``KnowledgeDistillationKLDivLoss``. ``LDHead`` passes each box's weight to its four sides and
    ``avg_factor=4.0``; pass ``weight`` (N,) and ``avg_factor=4`` here for the same value.

    Args:
        pred (Tensor[N, 4 * (reg_max + 1)] or Tensor[N * 4, reg_max + 1]): student bin logits, four sides per row
            or, as ``LDHead`` passes them, one.
        soft_label (Tensor of ``pred``'s shape): teacher bin logits.
        weight (Tensor[N] or Tensor[N, 4], optional): per-row or per-side weight; weight 0 masks the box (side),
            NaN/inf inputs there included.
        T: temperature, > 0 (LD uses 10).
        reg_max: the largest bin index.
        avg_factor (Tensor[], optional): denominator of the mean.

    Returns:
        Tensor[N, 4] (four sides per row) or Tensor[N * 4] for "none", else Tensor[].
    """
    if not torch.jit.is_scripting():
        refuse_misplaced_reduction("localization_distillation_loss", {"T": T, "reg_max": reg_max})
    bins = reg_max + 1
    # MMDetection's LDHead reshapes both to one side per row, (N * 4, reg_max + 1), before calling its loss
    sides = 1 if pred.dim() == 2 and pred.size(1) == bins else 4
    if (
        pred.dim() != 2 or pred.size(1) != sides * bins
        or not same_shape(soft_label, pred, "the shapes of pred and soft_label")
    ):
        raise ValueError(
            "expected pred and soft_label of shape (N, 4 * (reg_max + 1)) = (N, " + str(4 * bins) + "), or one side "
            "per row (N * 4, " + str(bins) + "), got " + str(pred.shape) + " and " + str(soft_label.shape)
        )
    dtype = logits_compute_dtype(pred)
    # (N, sides, bins): the last axis is the distribution of one side
    n = pred.size(0)  # not -1: a reshape cannot infer -1 from 0 elements
    pred = pred.to(dtype).reshape(n, sides, bins)
    soft_label = soft_label.to(dtype).reshape(n, sides, bins)
    if weight is not None:
        weight = weight.to(dtype)
        if weight.dim() == 1 and same_size(weight.size(0), pred.size(0), "the weight's and pred's rows"):
            weight = weight.unsqueeze(1)
        elif (
            sides == 1 or weight.dim() != 2 or weight.size(1) != 4
            or not same_size(weight.size(0), pred.size(0), "the weight's and pred's rows")
        ):
            raise ValueError(
                "weight must have shape (N,) or, with four sides per row, (N, 4) for pred " + str(pred.shape)
                + ", got " + str(weight.shape)
            )
        keep = weight_keep_mask(weight.unsqueeze(2))
        pred = zero_where_unweighted(pred, keep)
        soft_label = zero_where_unweighted(soft_label, keep)
    loss = soft_label_kl_div(pred, soft_label, T, detach_target)
    if sides == 1:
        loss = loss.squeeze(1)
        weight = None if weight is None else weight.squeeze(1)
    return weight_reduce_loss(loss, weight, reduction, avg_factor)


class LocalizationDistillationLoss(WeightedLoss):
    """Localization-distillation module; see :func:`localization_distillation_loss`.

    ``forward(pred, soft_label, weight=None, avg_factor=None, reduction_override=None)`` with the student's and the
    teacher's DFL bin logits of the same boxes, both (N, 4 * (reg_max + 1)) (checked on every call). MMDetection
    configures LD as ``KnowledgeDistillationKLDivLoss(loss_weight=0.25, T=10)`` on the ``(N * 4, reg_max + 1)``
    reshape; that form is available as such, and this one takes the head's own layout.

    Args:
        reduction, loss_weight: see :mod:`visdet_export.reduction`.
        T: temperature, > 0 (default 10 as in LD).
        reg_max: the largest bin index, >= 1 (default 16 as in GFL).
    """

    T: float
    reg_max: int

    def __init__(self, reduction: str = "mean", loss_weight: float = 1.0, T: float = 10.0, reg_max: int = 16) -> None:
        super().__init__(reduction, loss_weight)
        self.T = _checked_temperature(T)
        self.reg_max = check_int("reg_max", reg_max, minimum=1)

    def forward(
        self,
        pred: Tensor,
        soft_label: Tensor,
        weight: Optional[Tensor] = None,
        avg_factor: AvgFactor = None,
        reduction_override: Optional[str] = None,
    ) -> Tensor:
        """``pred`` and ``soft_label`` (N, 4 * (reg_max + 1)) student and teacher bin logits, or one side per row
        (N * 4, reg_max + 1); ``weight`` (N,) or (N, 4). Returns the loss times ``loss_weight``: 0-d, or (N, 4)
        (one side per row: (N * 4,)) under "none"."""
        if not torch.jit.is_scripting():
            refuse_non_tensors(self, pred, {"soft_label": soft_label}, weight)
        reduction = resolve_reduction(self.reduction, reduction_override)
        loss = localization_distillation_loss(
            pred, soft_label, weight, static(self.T), self.reg_max, reduction, as_avg_factor(avg_factor, pred)
        )
        return self.weighted(loss)

    def extra_repr(self) -> str:
        return f"T={self.T}, reg_max={self.reg_max}, " + super().extra_repr()
