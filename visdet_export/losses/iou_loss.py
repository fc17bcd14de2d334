"""IoU and GIoU losses for box regression (FCOS, ATSS, GFL).

References: Yu et al., "UnitBox", https://arxiv.org/abs/1608.01471; Rezatofighi et al., "Generalized
Intersection over Union", https://arxiv.org/abs/1902.09630. Semantics follow visdet / MMDetection 3.x
``iou_loss.py`` and ``bbox_overlaps``, written with ``clamp`` instead of boolean-mask writes and without the
early return on all-zero weights.
"""


from typing import Any, Optional, Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..numerics import (
    aligned_box_iou,
    attach_gradient,
    check_same_shape,
    compiled_training,
    eager_closed_form,
    max_side_weight,
    needs_grad,
    returned_fresh,
    same_shape,
    same_size,
    saved_gradient_dtype,
    select_kept_,
    static,
    upcast_inputs,
    weight_keep_mask,
)
from ..reduction import AvgFactor, as_avg_factor, quoted, resolve_reduction, weight_reduce_loss
from ..validation import check_bool, check_choice, check_float, warn_caller
from .base import WeightedLoss, refuse_misplaced_reduction, refuse_non_tensors

IOU_MODES = ("linear", "square", "log")


#: The smallest ``eps`` the IoU losses take: the GIoU gradient divides by the squared enclosing area, clamped at
#: ``eps``, which overflows float32 below ~1e-19 (NaN gradients for point boxes at eps = 1e-20 eager, 1e-23
#: scripted); MMDetection's defaults are 1e-6 and 1e-7.
SMALLEST_EPS = 1e-12
_SMALLEST_EPS_WHY = (
    "the union and enclosing areas are clamped at eps, and GIoU's gradient divides by the enclosing area squared, "
    f"which overflows float32 below ~1e-19; write eps={SMALLEST_EPS:g} where a config has a smaller one "
    "(MMDetection's YOLOX head uses eps=1e-16)"
)


def box_inputs(
    pred: Tensor, target: Tensor, weight: Optional[Tensor]
) -> tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """Upcast and check (N, 4) boxes; a weight (N,) or (N, 4) (averaged over the last axis, as MMDetection does)
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
    if weight.dim() == 2 and same_shape(weight, pred, "the shapes of weight and pred"):
        weight = weight.mean(-1)
    elif weight.dim() != 1 or not same_size(weight.size(0), pred.size(0), "the weight's and pred's rows"):
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
    if mode != "linear" and mode != "square" and mode != "log":
        raise ValueError("mode=" + quoted(mode) + " is not valid; choose one of 'linear', 'square', 'log'")
    return _box_loss(pred, target, weight, mode, eps, reduction, avg_factor)


def giou_loss(
    pred: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    eps: float = 1e-7,
    reduction: str = "mean",
    avg_factor: Optional[Tensor] = None,
) -> Tensor:
    r"""GIoU loss :math:`1 - \mathrm{GIoU}`, in [0, 2]; arguments as :func:`iou_loss`. ``eps`` defaults to 1e-7,
    as MMDetection's ``giou_loss`` function (its module and :class:`GIoULoss` pass 1e-6)."""
    if not torch.jit.is_scripting():
        refuse_misplaced_reduction("giou_loss", {"eps": eps})
    return _box_loss(pred, target, weight, "giou", eps, reduction, avg_factor)


def _box_loss(
    pred: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    mode: str,
    eps: float,
    reduction: str,
    avg_factor: Optional[Tensor],
) -> Tensor:
    input_dtype = pred.dtype
    pred, target, weight, keep = box_inputs(pred, target, weight)
    if eager_closed_form(pred, target, weight):
        return weight_reduce_loss(_box_loss_eager(pred, target, weight, keep, mode, eps), None, reduction, avg_factor)
    if mode != "giou" and keep is not None and compiled_training(pred, target):
        # the weight applies outside the Function: a trained one gets its gradient from autograd
        loss = _iou_loss_saved_gradient(pred, target, keep, mode, eps, input_dtype)
        return weight_reduce_loss(loss, weight, reduction, avg_factor)
    return weight_reduce_loss(_box_loss_per_box(pred, target, keep, mode, eps), weight, reduction, avg_factor)


def _box_loss_per_box(pred: Tensor, target: Tensor, keep: Optional[Tensor], mode: str, eps: float) -> Tensor:
    """Loss (N,) of each box pair for ``mode`` "linear" | "square" | "log" (IoU) or "giou" (autograd formulation)."""
    if mode == "giou":
        return 1.0 - aligned_box_iou(pred, target, eps, generalized=True, keep=keep)
    ious = aligned_box_iou(pred, target, _union_eps(mode, eps), keep=keep).clamp(min=eps)
    if mode == "linear":
        return 1.0 - ious
    if mode == "square":
        return 1.0 - ious * ious
    return -ious.log()


def _union_eps(mode: str, eps: float) -> float:
    """The union's lower clamp: GIoU's own eps; for the IoU losses visdet's bbox_overlaps default (1e-6), before
    IoULoss clamps the IoU at its eps."""
    return eps if mode == "giou" else 1e-6


@torch.jit.unused
def _box_loss_eager(
    pred: Tensor, target: Tensor, weight: Optional[Tensor], keep: Optional[Tensor], mode: str, eps: float
) -> Tensor:
    """:func:`_box_loss_per_box` times a frozen ``weight`` with the gradient in closed form (see
    :func:`_box_loss_terms`), where autograd keeps some twenty (N,) intermediates for the backward pass. Boxes of
    weight 0 are zeroed in the outputs (NaN / inf coordinates there included) rather than in copies of the inputs."""
    grad = torch.empty_like(pred) if needs_grad(pred) else None
    with torch.no_grad():
        value = _box_loss_terms(pred.unbind(1), target.unbind(1), mode, eps, None if grad is None else grad.unbind(1))
        if keep is not None:
            value = select_kept_(value, keep)
            grad = None if grad is None else select_kept_(grad, keep.unsqueeze(1))
    return attach_gradient(
        value.unsqueeze(1), grad, pred, None if weight is None else weight.unsqueeze(1),
        lambda x: _box_loss_per_box(x, target, keep, mode, eps).unsqueeze(1),
    ).squeeze(1)


def _clamp_min_(x: Tensor, bound: float) -> tuple[Tensor, Tensor]:
    """``x.clamp_(min=bound)`` and where its gradient passes (ATen: ``x >= bound``), as a bool mask."""
    passes = x >= bound
    return x.clamp_(min=bound), passes


def _iou_mode_terms(iou: Tensor, mode: str, eps: float) -> tuple[Tensor, Tensor]:
    """The IoU loss of ``mode`` on ``iou`` clamped at ``eps``, and its derivative with respect to ``iou``."""
    clamped, passes = _clamp_min_(iou.clone(), eps)
    slope = passes.to(iou.dtype)
    if mode == "linear":
        return 1.0 - clamped, slope.neg_()
    if mode == "square":
        return 1.0 - clamped * clamped, slope.mul_(clamped).mul_(-2.0)
    return clamped.log().neg_(), slope.div_(clamped).neg_()


@torch.jit.unused
def _box_loss_terms(
    pred_columns: Sequence[Tensor],
    target_columns: Sequence[Tensor],
    mode: str,
    eps: float,
    grad_columns: Optional[Sequence[Tensor]],
) -> Tensor:
    """Per-box loss (N,) of :func:`_box_loss_per_box` (without masking) from the coordinate columns (N,) of both
    box sets, and its derivative with respect to the predicted ``x1, y1, x2, y2`` written into ``grad_columns``
    (four (N,) buffers, when given), by hand: the chain rule through areas, overlap, union (and enclosing box) with
    ATen's conventions, ``clamp(min=b)`` passing the gradient where ``x >= b`` and ``maximum`` / ``minimum``
    halving it at ties. Written to keep few (N,) tensors alive at once: clamps in place, where their gradient
    passes as bools."""
    generalized = mode == "giou"
    union_eps = _union_eps(mode, eps)
    px1, py1, px2, py2 = pred_columns
    tx1, ty1, tx2, ty2 = target_columns
    pred_w, pred_w_passes = _clamp_min_(px2 - px1, 0.0)
    pred_h, pred_h_passes = _clamp_min_(py2 - py1, 0.0)
    overlap_w, overlap_w_passes = _clamp_min_(torch.minimum(px2, tx2).sub_(torch.maximum(px1, tx1)), 0.0)
    overlap_h, overlap_h_passes = _clamp_min_(torch.minimum(py2, ty2).sub_(torch.maximum(py1, ty1)), 0.0)
    overlap = overlap_w * overlap_h
    union = (pred_w * pred_h).add_((tx2 - tx1).clamp_(min=0.0).mul_((ty2 - ty1).clamp_(min=0.0))).sub_(overlap)
    union, union_passes = _clamp_min_(union, union_eps)
    iou = overlap.div_(union)
    if generalized:
        enclose_w, enclose_w_passes = _clamp_min_(torch.maximum(px2, tx2).sub_(torch.minimum(px1, tx1)), 0.0)
        enclose_h, enclose_h_passes = _clamp_min_(torch.maximum(py2, ty2).sub_(torch.minimum(py1, ty1)), 0.0)
        enclose, enclose_passes = _clamp_min_(enclose_w * enclose_h, eps)
        value = 1.0 - (iou - (enclose - union) / enclose)
        d_iou = torch.full_like(iou, -1.0)
    else:
        value, d_iou = _iou_mode_terms(iou, mode, eps)
    if grad_columns is None:
        return value
    dtype = iou.dtype
    # iou = overlap / union, union = area_p + area_t - overlap; GIoU adds (enclose - union) / enclose
    d_union = iou.mul_(d_iou).div_(union).neg_()
    if generalized:
        d_union.sub_(enclose.reciprocal())
    d_union.mul_(union_passes.to(dtype))
    d_overlap = d_iou.div_(union).sub_(d_union)
    # each side's buffer takes the other side's derivative once it is used up: no new (N,) tensors
    d_overlap_w = overlap_h.mul_(d_overlap).mul_(overlap_w_passes.to(dtype))
    d_overlap_h = d_overlap.mul_(overlap_w).mul_(overlap_h_passes.to(dtype))
    d_pred_w = pred_h.mul_(d_union).mul_(pred_w_passes.to(dtype))
    d_pred_h = d_union.mul_(pred_w).mul_(pred_h_passes.to(dtype))
    # x1 enters the width (-), max(x1, t1) of the overlap (-) and min(x1, t1) of the enclosing box (-); x2 the
    # width (+), min(x2, t2) of the overlap and max(x2, t2) of the enclosing box
    d_x1, d_y1, d_x2, d_y2 = grad_columns
    torch.mul(d_overlap_w, max_side_weight(px1, tx1), out=d_x1).add_(d_pred_w).neg_()
    torch.mul(d_overlap_h, max_side_weight(py1, ty1), out=d_y1).add_(d_pred_h).neg_()
    torch.mul(d_overlap_w, max_side_weight(tx2, px2), out=d_x2).add_(d_pred_w)
    torch.mul(d_overlap_h, max_side_weight(ty2, py2), out=d_y2).add_(d_pred_h)
    if generalized:
        d_enclose = enclose.mul_(enclose).reciprocal_().mul_(union).mul_(enclose_passes.to(dtype))
        d_enclose_w = enclose_h.mul_(d_enclose).mul_(enclose_w_passes.to(dtype))
        d_enclose_h = d_enclose.mul_(enclose_w).mul_(enclose_h_passes.to(dtype))
        d_x1.sub_(max_side_weight(tx1, px1).mul_(d_enclose_w))
        d_y1.sub_(max_side_weight(ty1, py1).mul_(d_enclose_h))
        d_x2.add_(max_side_weight(px2, tx2).mul_(d_enclose_w))
        d_y2.add_(max_side_weight(py2, ty2).mul_(d_enclose_h))
    return value


@torch.jit.unused
def _iou_loss_saved_gradient(
    pred: Tensor, target: Tensor, keep: Tensor, mode: str, eps: float, input_dtype: torch.dtype
) -> Tensor:
    return _SavedBoxGradient.apply(pred, target, keep, mode, eps, saved_gradient_dtype(input_dtype))


class _SavedBoxGradient(torch.autograd.Function):
    """The IoU loss (N,) of each box pair, for torch.compile'd training with a weight: the forward computes the
    loss and its derivative in closed form (:func:`_box_loss_terms`) in one fused kernel, the backward scales the
    saved derivative. Against inductor's autograd graph it keeps one (4, N) buffer instead of eight masked
    coordinate columns: compiled IoU fwd+bwd, 1 thread, at 1M boxes ~16 -> ~9.5 ms, at 100k ~1.8 -> ~1.2 ms; peak
    memory 3.0 -> 1.5 x (pred + grad) (torch 2.13). The backward interleaves the four rows into (N, 4) with a
    stack, which inductor writes as a scalar loop of four stride-4 stores; still the fastest of the layouts
    measured (``.t().contiguous()``, a transposition by 4-lane partial vectors, took twice as long; packed int64
    pairs, gathers and index writes no better: benchmarks/RESULTS.md, round 9).

    Tied to inductor's CPU heuristic that turns vectorisation off at 35 non-contiguous loads per kernel (torch
    2.13; results stay exact either way, only the speed changes): the masked columns read the boxes in 32; unmasked
    (no weight) in 48, a scalar loop 2.5x slower than the autograd graph, which those calls keep. The derivative is
    written (4, N), one contiguous row per coordinate: its stride-4 stores as (N, 4) cross the threshold too, and
    the boxes copied into contiguous columns first cost a slower transposition. GIoU keeps the autograd graph, whose
    split forward and backward kernels compute less than its fused closed form (9 against 17 ms at 1M boxes)."""

    @staticmethod
    def forward(
        ctx: Any, pred: Tensor, target: Tensor, keep: Tensor, mode: str, eps: float, saved_dtype: torch.dtype
    ) -> Tensor:
        # boxes of weight 0 computed as zeros: finite, and the weight zeroes their value and gradient
        columns = [torch.where(keep, column, 0.0) for column in pred.unbind(1) + target.unbind(1)]
        grad_columns = [pred.new_empty(pred.size(0)) for _ in range(4)]
        value = _box_loss_terms(columns[:4], columns[4:], mode, eps, grad_columns)
        grad = torch.stack(grad_columns).to(saved_dtype)  # numerics.saved_gradient_dtype
        ctx.save_for_backward(grad)
        return returned_fresh(value)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, None, None, None, None, None]:
        (grad,) = ctx.saved_tensors
        return torch.stack((grad * grad_output).unbind(0), 1), None, None, None, None, None


class IoULoss(WeightedLoss):
    """IoU loss module; see :func:`iou_loss`.

    Args:
        linear: deprecated, ``True`` means ``mode="linear"``.
        eps: lower clamp of the IoU, at least :data:`SMALLEST_EPS`.
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
            warn_caller('IoULoss(linear=True) is deprecated; use mode="linear"', DeprecationWarning)
            self.mode = "linear"
        self.eps = check_float("eps", eps, minimum=SMALLEST_EPS, why=_SMALLEST_EPS_WHY)

    def forward(
        self,
        pred: Tensor,
        target: Tensor,
        weight: Optional[Tensor] = None,
        avg_factor: AvgFactor = None,
        reduction_override: Optional[str] = None,
    ) -> Tensor:
        """``pred`` and ``target`` (N, 4) boxes (x1, y1, x2, y2); ``weight`` (N,) or (N, 4) (averaged per box).
        Returns the loss times ``loss_weight``: 0-d, or (N,) under "none"."""
        if not torch.jit.is_scripting():
            refuse_non_tensors(self, pred, {"target": target}, weight)
        reduction = resolve_reduction(self.reduction, reduction_override)
        loss = iou_loss(pred, target, weight, self.mode, static(self.eps), reduction, as_avg_factor(avg_factor, pred))
        return self.weighted(loss)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, eps={self.eps}, " + super().extra_repr()


class GIoULoss(WeightedLoss):
    """GIoU loss module; see :func:`giou_loss`.

    Args:
        eps: lower clamp of the union and enclosing areas, at least :data:`SMALLEST_EPS`.
    """

    eps: float

    def __init__(self, eps: float = 1e-6, reduction: str = "mean", loss_weight: float = 1.0) -> None:
        super().__init__(reduction, loss_weight)
        self.eps = check_float("eps", eps, minimum=SMALLEST_EPS, why=_SMALLEST_EPS_WHY)

    def forward(
        self,
        pred: Tensor,
        target: Tensor,
        weight: Optional[Tensor] = None,
        avg_factor: AvgFactor = None,
        reduction_override: Optional[str] = None,
    ) -> Tensor:
        """``pred`` and ``target`` (N, 4) boxes (x1, y1, x2, y2); ``weight`` (N,) or (N, 4) (averaged per box).
        Returns the loss times ``loss_weight``: 0-d, or (N,) under "none"."""
        if not torch.jit.is_scripting():
            refuse_non_tensors(self, pred, {"target": target}, weight)
        reduction = resolve_reduction(self.reduction, reduction_override)
        loss = giou_loss(pred, target, weight, static(self.eps), reduction, as_avg_factor(avg_factor, pred))
        return self.weighted(loss)

    def extra_repr(self) -> str:
        return f"eps={self.eps}, " + super().extra_repr()
