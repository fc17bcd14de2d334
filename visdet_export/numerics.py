"""Numerically safe building blocks shared by the losses.

Everything here is data-independent (no Python decisions on tensor values, no data-dependent shapes) and keeps
values and gradients finite at the extremes that break the textbook formulas: saturated logits, zero bases of
fractional powers, degenerate boxes, and masked-out elements whose inputs are NaN or inf.
"""


from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def compute_dtype(tensor: Tensor) -> torch.dtype:
    """float16/bfloat16 are computed in float32 (box areas overflow float16); float64 stays float64."""
    if tensor.dtype == torch.float64:
        return torch.float64
    return torch.float32


def sigmoid_pair(logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(sigmoid(x), sigmoid(-x), log1p(exp(-|x|)))`` from one ``exp``.

    ``sigmoid(-x)`` is computed directly rather than as ``1 - sigmoid(x)``, so the focal modulating factor of a
    confident prediction keeps its precision instead of cancelling to 0.
    """
    nonnegative = logits >= 0
    # |x| written as a where so that x = 0 differentiates on the x >= 0 side, consistently with
    # bce_with_logits (``logits.abs()`` has slope 0 at 0, which made sigmoid'(0) = 0 and BCE'(0) = -t).
    decay = torch.exp(-torch.where(nonnegative, logits, -logits))
    inverse = 1.0 / (1.0 + decay)
    small = decay * inverse
    return torch.where(nonnegative, inverse, small), torch.where(nonnegative, small, inverse), torch.log1p(decay)


def bce_with_logits(logits: Tensor, target: Tensor, log1p_decay: Tensor, pos_weight: Optional[Tensor] = None) -> Tensor:
    """Binary cross-entropy on logits in the stable ``softplus`` form.

    ``relu(x) - x*t + log1p(exp(-|x|))``, with ``pos_weight`` as in ``F.binary_cross_entropy_with_logits``. The
    exporter lowers the built-in to ``Log(Sigmoid(x))``, which onnxruntime turns into inf/NaN for |x| >= 18.

    Args:
        logits (Tensor[*]), target (Tensor[*]) in [0, 1], log1p_decay (Tensor[*]): ``log1p(exp(-|x|))``.
        pos_weight (Tensor broadcastable to ``logits``, optional): weight of the positive term.
    """
    if pos_weight is None:
        # clamp (slope 1 at 0) pairs with sigmoid_pair's x >= 0 side of |x|: the slope at 0 is 1 - 1/2 - t.
        return logits.clamp(min=0) - logits * target + log1p_decay
    softplus_neg = torch.relu(-logits) + log1p_decay
    return (1.0 - target) * logits + (1.0 + (pos_weight - 1.0) * target) * softplus_neg


def bce_with_probabilities(probs: Tensor, target: Tensor) -> Tensor:
    """``F.binary_cross_entropy`` element-wise: logs clamped at -100, gradient finite at 0 and 1."""
    return F.binary_cross_entropy(probs, target, reduction="none")


def pow_nonnegative(base: Tensor, exponent: float) -> Tensor:
    """``base ** exponent`` for ``base >= 0`` with a finite gradient at 0.

    A fractional power of 0 has an infinite slope, and ``inf * 0`` is NaN in the backward pass, so zero bases
    take a constant branch whose input is also replaced ("double where").
    """
    if exponent == 0.0:
        return torch.ones_like(base)
    if exponent == 1.0:
        return base
    if exponent == 2.0:
        return base * base
    positive = base > 0
    return torch.where(positive, torch.where(positive, base, 1.0).pow(exponent), 0.0)


def zero_where_unweighted(tensor: Tensor, keep: Optional[Tensor]) -> Tensor:
    """Replace the elements that carry no weight by 0, so NaN/inf there reach neither value nor gradient.

    Args:
        tensor (Tensor[*]): an input of the loss.
        keep (Tensor[bool] broadcastable to ``tensor``, optional): elements that take part in the loss.
    """
    if keep is None:
        return tensor
    return torch.where(keep, tensor, torch.zeros_like(tensor))


def weight_keep_mask(weight: Optional[Tensor]) -> Optional[Tensor]:
    if weight is None:
        return None
    return weight != 0


def check_same_shape(pred: Tensor, target: Tensor, target_name: str) -> None:
    """Shapes must match exactly: a silent (N, 1) against (N,) broadcast would give an (N, N) loss."""
    if pred.shape != target.shape:
        raise ValueError(
            "pred and " + target_name + " must have the same shape, got " + str(pred.shape) + " and " + str(target.shape)
        )


def aligned_box_iou(pred: Tensor, target: Tensor, eps: float, generalized: bool = False) -> Tensor:
    """IoU (or GIoU) of matching rows of two box sets in ``(x1, y1, x2, y2)``.

    Widths and heights are clamped at 0, so an inverted box (x2 < x1) is an empty box: visdet multiplies two
    negative sides into a positive area and can report a GIoU above 1 for nonsense boxes. The union and the
    enclosing area are clamped at ``eps`` as in visdet's ``bbox_overlaps``.

    Args:
        pred (Tensor[N, 4]), target (Tensor[N, 4]): boxes.

    Returns:
        Tensor[N]: IoU in [0, 1], or GIoU in [-1, 1].
    """
    pred_wh = (pred[:, 2:] - pred[:, :2]).clamp(min=0)
    target_wh = (target[:, 2:] - target[:, :2]).clamp(min=0)
    pred_area = pred_wh[:, 0] * pred_wh[:, 1]
    target_area = target_wh[:, 0] * target_wh[:, 1]
    overlap_wh = (torch.minimum(pred[:, 2:], target[:, 2:]) - torch.maximum(pred[:, :2], target[:, :2])).clamp(min=0)
    overlap = overlap_wh[:, 0] * overlap_wh[:, 1]
    union = (pred_area + target_area - overlap).clamp(min=eps)
    iou = overlap / union
    if not generalized:
        return iou
    enclose_wh = (torch.maximum(pred[:, 2:], target[:, 2:]) - torch.minimum(pred[:, :2], target[:, :2])).clamp(min=0)
    enclose_area = (enclose_wh[:, 0] * enclose_wh[:, 1]).clamp(min=eps)
    return iou - (enclose_area - union) / enclose_area


def regression_inputs(
    pred: Tensor, target: Tensor, weight: Optional[Tensor]
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Upcast, check and mask the inputs of an element-wise regression loss.

    Args:
        pred (Tensor[*]), target (Tensor[*]): same shape.
        weight (Tensor[*] or Tensor[*][:-1], optional): element weights, or one weight per row of the last axis.

    Returns:
        ``(pred, target, weight)`` in the compute dtype, with ``weight`` broadcastable to ``pred`` and the
        elements of weight 0 replaced by 0 in ``pred`` and ``target``.
    """
    check_same_shape(pred, target, "target")
    if not pred.is_floating_point() or not target.is_floating_point():
        raise ValueError("regression pred and target must be floating point, got an integer or bool tensor")
    dtype = compute_dtype(pred)
    pred = pred.to(dtype)
    target = target.to(dtype)
    if weight is None:
        return pred, target, None
    weight = weight.to(dtype)
    if weight.dim() + 1 == pred.dim():
        weight = weight.unsqueeze(-1)
    keep = weight_keep_mask(weight)
    return zero_where_unweighted(pred, keep), zero_where_unweighted(target, keep), weight
