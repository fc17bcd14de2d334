"""IoU and GIoU losses for box regression (FCOS, ATSS, GFL).

References: Yu et al., "UnitBox", https://arxiv.org/abs/1608.01471; Rezatofighi et al., "Generalized
Intersection over Union", https://arxiv.org/abs/1902.09630. Semantics follow visdet / MMDetection 3.x
``iou_loss.py`` and ``bbox_overlaps``, written with ``clamp`` instead of boolean-mask writes and without the
early return on all-zero weights.
"""


import warnings
from typing import Optional

from torch import Tensor

from ..numerics import aligned_box_iou, check_same_shape, upcast_inputs, weight_keep_mask
from ..reduction import AvgFactor, as_avg_factor, resolve_reduction, weight_reduce_loss
from ..validation import check_bool, check_choice, check_float
from .base import WeightedLoss

IOU_MODES = ("linear", "square", "log")


def box_inputs(
    pred: Tensor, target: Tensor, weight: Optional[Tensor]
) -> tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """Upcast and check (N, 4) boxes; a weight (N,) or (N, 4) (averaged over the last axis, as visdet does)
    masks the boxes of weight 0, NaN/inf coordinates included.

    Returns:
        ``(pred, target, weight, keep)`` with ``weight`` of shape (N,) or None and ``keep`` (N,) bool (or None)
        the boxes that take part, for :func:`~visdet_export.numerics.aligned_box_iou` to mask.
    """
    check_same_shape(pred, target, "target")
    if pred.dim() != 2 or pred.size(1) != 4:
        raise ValueError("boxes must have shape (N, 4) as (x1, y1, x2, y2), got " + str(pred.shape))
    if not pred.is_floating_point() or not target.is_floating_point():
        raise ValueError("pred and target boxes must be floating point, got an integer or bool tensor")
    pred, target, weight = upcast_inputs(pred, target, weight)
    if weight is None:
        return pred, target, None, None
    if weight.dim() == 2:
        check_same_shape(pred, weight, "weight")
        weight = weight.mean(-1)
    elif weight.dim() != 1 or weight.size(0) != pred.size(0):
        raise ValueError("weight must have shape (N,) or (N, 4), got " + str(weight.shape))
    return pred, target, weight, weight_keep_mask(weight)


def iou_loss(
    pred: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    mode: str = "log",
    eps: float = 1e-6,
    reduction: str = "mean",
    avg_factor: Optional[Tensor] = None,
) -> Tensor:
    r"""IoU loss: ``1 - iou`` (linear), ``1 - iou**2`` (square) or ``-log(iou)`` (log), IoU clamped at ``eps``.

    Boxes are ``(x1, y1, x2, y2)``; inverted sides count as empty (see
    :func:`~visdet_export.numerics.aligned_box_iou`), so any degenerate box gives the finite worst-case loss
    (1, 1 or ``-log(eps)``) rather than visdet's arbitrary values.

    Args:
        pred (Tensor[N, 4]), target (Tensor[N, 4]).
        weight (Tensor[N] or Tensor[N, 4], optional).

    Returns:
        Tensor[N] for "none", else Tensor[].
    """
    pred, target, weight, keep = box_inputs(pred, target, weight)
    # visdet's bbox_overlaps clamps the union at its default eps (1e-6) before IoULoss clamps the IoU at its own.
    ious = aligned_box_iou(pred, target, 1e-6, keep=keep).clamp(min=eps)
    if mode == "linear":
        loss = 1.0 - ious
    elif mode == "square":
        loss = 1.0 - ious * ious
    elif mode == "log":
        loss = -ious.log()
    else:
        raise ValueError("mode=" + mode + " is not valid; choose one of 'linear', 'square', 'log'")
    return weight_reduce_loss(loss, weight, reduction, avg_factor)


def giou_loss(
    pred: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    eps: float = 1e-6,
    reduction: str = "mean",
    avg_factor: Optional[Tensor] = None,
) -> Tensor:
    r"""GIoU loss :math:`1 - \mathrm{GIoU}`, in [0, 2]; arguments as :func:`iou_loss`."""
    pred, target, weight, keep = box_inputs(pred, target, weight)
    loss = 1.0 - aligned_box_iou(pred, target, eps, generalized=True, keep=keep)
    return weight_reduce_loss(loss, weight, reduction, avg_factor)


class IoULoss(WeightedLoss):
    """IoU loss module; see :func:`iou_loss`.

    Args:
        linear: deprecated, ``True`` means ``mode="linear"``.
        eps: lower clamp of the IoU, > 0.
        mode: "linear" | "square" | "log".
    """

    mode: str
    eps: float

    def __init__(
        self,
        linear: bool = False,
        eps: float = 1e-6,
        reduction: str = "mean",
        loss_weight: float = 1.0,
        mode: str = "log",
    ) -> None:
        super().__init__(reduction, loss_weight)
        self.mode = check_choice("mode", mode, IOU_MODES)
        if check_bool("linear", linear):
            warnings.warn(
                'IoULoss(linear=True) is deprecated; use mode="linear"', DeprecationWarning, stacklevel=2
            )
            self.mode = "linear"
        self.eps = check_float("eps", eps, minimum=0.0, min_inclusive=False)

    def forward(
        self,
        pred: Tensor,
        target: Tensor,
        weight: Optional[Tensor] = None,
        avg_factor: AvgFactor = None,
        reduction_override: Optional[str] = None,
    ) -> Tensor:
        reduction = resolve_reduction(self.reduction, reduction_override)
        loss = iou_loss(pred, target, weight, self.mode, self.eps, reduction, as_avg_factor(avg_factor, pred))
        return self.loss_weight * loss

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, eps={self.eps}, " + super().extra_repr()


class GIoULoss(WeightedLoss):
    """GIoU loss module; see :func:`giou_loss`.

    Args:
        eps: lower clamp of the union and enclosing areas, > 0.
    """

    eps: float

    def __init__(self, eps: float = 1e-6, reduction: str = "mean", loss_weight: float = 1.0) -> None:
        super().__init__(reduction, loss_weight)
        self.eps = check_float("eps", eps, minimum=0.0, min_inclusive=False)

    def forward(
        self,
        pred: Tensor,
        target: Tensor,
        weight: Optional[Tensor] = None,
        avg_factor: AvgFactor = None,
        reduction_override: Optional[str] = None,
    ) -> Tensor:
        reduction = resolve_reduction(self.reduction, reduction_override)
        loss = giou_loss(pred, target, weight, self.eps, reduction, as_avg_factor(avg_factor, pred))
        return self.loss_weight * loss

    def extra_repr(self) -> str:
        return f"eps={self.eps}, " + super().extra_repr()
