"""An independent float64 reference for every loss, written from the formulas (MMDetection 3.x semantics).

Nothing here imports visdet_export's loss functions or numerics: the point is a second, deliberately plain
implementation (one-hot, boolean masks, ``nonzero``, index writes, ``F.binary_cross_entropy_with_logits`` in
float64) to hold the compile-friendly production code against. Where our documented contract differs from
visdet (see the production docstrings), the reference follows the contract:

* inverted boxes: widths and heights are clamped at 0 (an empty box), so nonsense boxes get the worst loss;
* softmax CE: labels outside [0, C) that are not ``ignore_index`` contribute 0 (visdet fails on them); with
  class-probability targets an ``ignore_index`` >= 0 is refused and ``avg_non_ignore`` divides by the samples
  (MMDetection would count the N x C target elements);
* mask CE: ``class_weight`` weights each RoI by its class, the result is a 0-d tensor and every reduction works;
  a RoI labelled outside [0, C) contributes 0;
* focal / sigmoid CE: labels outside [0, C) are background (an all-zero one-hot row);
* DFL: a target exactly at ``reg_max`` puts all its mass on the last bin;
* a "mean" over zero elements is 0, and elements of weight 0 never contribute (callers of the reference pass
  finite inputs there; the edge tests check that NaN/inf in masked elements change nothing).

Entry point: :func:`reference_loss` ``(cfg, pred, target, weight, avg_factor, reduction_override)`` with the same
argument conventions as the modules' ``forward``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

FLOAT32_EPS = 1.1920928955078125e-07  # torch.finfo(torch.float32).eps, visdet's avg_factor epsilon
SEED_LOSS_NAMES = (
    "BalancedL1Loss",
    "CrossEntropyLoss",
    "DistributionFocalLoss",
    "FocalLoss",
    "GIoULoss",
    "IoULoss",
    "L1Loss",
    "MSELoss",
    "QualityFocalLoss",
    "SmoothL1Loss",
)

# Defaults of every loss, as visdet / MMDetection 3.x declares them.
DEFAULTS: dict[str, dict[str, object]] = {
    "FocalLoss": dict(use_sigmoid=True, gamma=2.0, alpha=0.25, reduction="mean", loss_weight=1.0, activated=False),
    "QualityFocalLoss": dict(use_sigmoid=True, beta=2.0, reduction="mean", loss_weight=1.0, activated=False),
    "DistributionFocalLoss": dict(reduction="mean", loss_weight=1.0, reg_max=None),
    "CrossEntropyLoss": dict(
        use_sigmoid=False,
        use_mask=False,
        reduction="mean",
        class_weight=None,
        ignore_index=-100,
        loss_weight=1.0,
        avg_non_ignore=False,
    ),
    "L1Loss": dict(reduction="mean", loss_weight=1.0),
    "SmoothL1Loss": dict(beta=1.0, reduction="mean", loss_weight=1.0),
    "MSELoss": dict(reduction="mean", loss_weight=1.0),
    "BalancedL1Loss": dict(alpha=0.5, gamma=1.5, beta=1.0, reduction="mean", loss_weight=1.0),
    "IoULoss": dict(linear=False, eps=1e-6, reduction="mean", loss_weight=1.0, mode="log"),
    "GIoULoss": dict(eps=1e-6, reduction="mean", loss_weight=1.0),
    "KnowledgeDistillationKLDivLoss": dict(reduction="mean", loss_weight=1.0, T=10.0),
    "LocalizationDistillationLoss": dict(reduction="mean", loss_weight=1.0, T=10.0, reg_max=16),
}

AvgFactor = Optional[Union[float, int, Tensor]]


# --- the shared weight / reduction contract -------------------------------------------------------------------


def reduce_reference(loss: Tensor, weight: Optional[Tensor], reduction: str, avg_factor: AvgFactor) -> Tensor:
    """visdet's ``weight_reduce_loss``: multiply by ``weight``, then reduce (a mean of nothing is 0)."""
    if weight is not None:
        loss = loss * weight
    if avg_factor is None:
        if reduction == "none":
            return loss
        if reduction == "sum":
            return loss.sum()
        if reduction == "mean":
            if loss.numel() == 0:
                return loss.sum() * 0.0
            return loss.sum() / loss.numel()
        raise ValueError(f"bad reduction {reduction!r}")
    if reduction == "sum":
        raise ValueError("avg_factor can not be used with reduction='sum'")
    if reduction == "none":
        return loss
    return loss.sum() / (float(avg_factor) + FLOAT32_EPS)


# --- element-wise losses ---------------------------------------------------------------------------------------


def one_hot_background(labels: Tensor, num_classes: int) -> Tensor:
    """(N, C) float64 one-hot rows; labels outside [0, C) (C = background) give an all-zero row."""
    inside = (labels >= 0) & (labels < num_classes)
    safe = torch.where(inside, labels, torch.full_like(labels, num_classes))
    return F.one_hot(safe.long(), num_classes + 1)[:, :num_classes].double()


def focal_elementwise(pred: Tensor, target: Tensor, gamma: float, alpha: float, activated: bool) -> Tensor:
    """MMDetection's ``py_sigmoid_focal_loss`` / ``py_focal_loss_with_prob`` before weighting: (N, C)."""
    if target.dim() != pred.dim():
        target = one_hot_background(target, pred.size(1))
    target = target.double()
    if activated:
        prob, one_minus_prob = pred, 1.0 - pred
        bce = F.binary_cross_entropy(pred, target, reduction="none")
    else:
        # sigmoid(-x) is 1 - sigmoid(x) without float64 cancellation at large |x|.
        prob, one_minus_prob = torch.sigmoid(pred), torch.sigmoid(-pred)
        bce = F.binary_cross_entropy_with_logits(pred, target, reduction="none")
    pt = one_minus_prob * target + prob * (1.0 - target)  # MMDetection's name for 1 - p_t
    focal_weight = pt.pow(gamma)
    if alpha >= 0:  # alpha = -1 disables the balancing, as in torchvision
        focal_weight = focal_weight * (alpha * target + (1.0 - alpha) * (1.0 - target))
    return bce * focal_weight


def focal_weight_shape(weight: Tensor, pred: Tensor) -> Tensor:
    """Weights (N,), (N, C) or (N * C,) as visdet's FocalLoss reshapes them."""
    if weight.shape == pred.shape:
        return weight
    if weight.dim() == 1 and weight.size(0) == pred.size(0):
        return weight.view(-1, 1)
    assert weight.numel() == pred.numel()
    return weight.view(pred.size(0), -1)


def qfl_elementwise(pred: Tensor, target: Union[tuple[Tensor, Tensor], Tensor], beta: float, activated: bool) -> Tensor:
    """MMDetection's ``quality_focal_loss`` (pair) / ``quality_focal_loss_tensor_target`` (dense): (N,)."""
    bce = F.binary_cross_entropy if activated else F.binary_cross_entropy_with_logits
    prob = pred if activated else torch.sigmoid(pred)
    # negatives: BCE towards 0, scaled by p^beta
    loss = bce(pred, torch.zeros_like(pred), reduction="none") * prob.pow(beta)
    num_classes = pred.size(1)
    if isinstance(target, Tensor):
        dense = target.double()
        pos = dense != 0
        if bool(pos.any()):
            scale = (dense[pos] - prob[pos]).abs().pow(beta)
            loss = loss.clone()
            loss[pos] = bce(pred[pos], dense[pos], reduction="none") * scale
    else:
        labels, scores = target
        scores = scores.double()
        pos = ((labels >= 0) & (labels < num_classes)).nonzero().squeeze(1)
        if pos.numel() > 0:
            pos_labels = labels[pos].long()
            scale = (scores[pos] - prob[pos, pos_labels]).abs().pow(beta)
            loss = loss.clone()
            loss[pos, pos_labels] = bce(pred[pos, pos_labels], scores[pos], reduction="none") * scale
    return loss.sum(dim=1)


def dfl_elementwise(pred: Tensor, target: Tensor) -> Tensor:
    """MMDetection's ``distribution_focal_loss``; target == reg_max puts all the mass on the last bin: (N,)."""
    reg_max = pred.size(1) - 1
    target = target.double()
    left = target.long()  # truncation, as MMDetection: a target in (-1, 0) weighs bins 0 and 1 by 1 - y and y
    right = left + 1
    weight_left = right.double() - target
    weight_right = target - left.double()
    loss = F.cross_entropy(pred, left.clamp(max=reg_max), reduction="none") * weight_left
    inside = right <= reg_max
    right_term = torch.zeros_like(loss)
    if bool(inside.any()):
        right_term = right_term.clone()
        right_term[inside] = F.cross_entropy(pred[inside], right[inside], reduction="none") * weight_right[inside]
    return loss + right_term


def softmax_ce_elementwise(pred: Tensor, label: Tensor, class_weight: Optional[Tensor], ignore_index: int) -> Tensor:
    """``F.cross_entropy(reduction="none")`` per sample; ignored and out-of-range labels give 0: label's shape."""
    num_classes = pred.size(1)
    valid = (label != ignore_index) & (label >= 0) & (label < num_classes)
    logits = pred.movedim(1, -1)  # (N, *, C)
    loss = torch.zeros(label.shape, dtype=pred.dtype)
    if bool(valid.any()):
        kept = label[valid].long()
        loss[valid] = F.cross_entropy(logits[valid], kept, reduction="none")
        if class_weight is not None:  # multiplied here, not passed to ATen, so that a trained weight gets its gradient
            loss[valid] = loss[valid] * class_weight[kept]
    return loss


def softmax_ce_probabilities_elementwise(pred: Tensor, target: Tensor, class_weight: Optional[Tensor]) -> Tensor:
    """``-sum_c w_c t_c log softmax(x)_c`` per sample (``F.cross_entropy``'s probability targets), with
    ``log softmax(x)_c = x_c - log sum_k exp(x_k)`` written out: (N, *)."""
    log_prob = pred - torch.logsumexp(pred, dim=1, keepdim=True)
    terms = target.double() * log_prob
    if class_weight is not None:
        terms = terms * class_weight.view(1, -1, *[1] * (pred.dim() - 2))
    return -terms.sum(dim=1)


def sigmoid_ce_parts(
    pred: Tensor, label: Tensor, weight: Optional[Tensor], class_weight: Optional[Tensor], ignore_index: int
) -> tuple[Tensor, Tensor, Tensor]:
    """MMDetection's ``binary_cross_entropy``: (element-wise loss, element weights, valid mask)."""
    if pred.dim() != label.dim():
        # _expand_onehot_labels
        num_classes = pred.size(-1)
        valid_rows = (label >= 0) & (label != ignore_index)
        targets = torch.zeros(pred.shape, dtype=torch.float64)
        inds = (valid_rows & (label < num_classes)).nonzero().squeeze(1)
        if inds.numel() > 0:
            targets[inds, label[inds].long()] = 1.0
        valid = valid_rows.view(-1, 1).expand(pred.shape).double()
        element_weight = valid if weight is None else weight.double().view(-1, 1).repeat(1, num_classes) * valid
    else:
        valid_bool = (label >= 0) & (label != ignore_index)
        valid = valid_bool.double()
        targets = torch.where(valid_bool, label.double(), torch.zeros((), dtype=torch.float64))
        if weight is None:
            element_weight = valid
        else:
            weight = weight.double()
            if weight.dim() == pred.dim() - 1 and pred.dim() > 1:
                weight = weight.unsqueeze(-1)
            element_weight = weight * valid
    # ``pos_weight`` written out (ATen's cannot differentiate a trained one)
    positive_weight = 1.0 if class_weight is None else class_weight
    loss = -(positive_weight * targets * F.logsigmoid(pred) + (1.0 - targets) * F.logsigmoid(-pred))
    return loss, element_weight, valid


def mask_ce_elementwise(pred: Tensor, target: Tensor, label: Tensor) -> Tensor:
    """BCE of each RoI's mask logits at its class: (R, H, W), or (R, P) for PointRend's points; zeros for a RoI
    labelled outside [0, C)."""
    rows = []
    for r in range(pred.size(0)):
        if 0 <= int(label[r]) < pred.size(1):
            logits = pred[r, int(label[r])]
            rows.append(F.binary_cross_entropy_with_logits(logits, target[r].double(), reduction="none"))
        else:
            rows.append(torch.zeros_like(target[r], dtype=pred.dtype))
    return torch.stack(rows) if rows else pred.new_zeros((0, *pred.shape[2:]))


def smooth_l1_elementwise(diff: Tensor, beta: float) -> Tensor:
    loss = diff - 0.5 * beta
    quadratic = diff < beta
    loss = loss.clone()
    loss[quadratic] = 0.5 * diff[quadratic] ** 2 / beta
    return loss


def balanced_l1_elementwise(diff: Tensor, alpha: float, gamma: float, beta: float) -> Tensor:
    b = math.e ** (gamma / alpha) - 1
    inner = alpha / b * (b * diff + 1) * torch.log(b * diff / beta + 1) - alpha * diff
    outer = gamma * diff + gamma / b - alpha * beta
    loss = outer.clone()
    small = diff < beta
    loss[small] = inner[small]
    return loss


def box_iou_parts(pred: Tensor, target: Tensor, union_eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Aligned ``bbox_overlaps`` pieces with inverted sides clamped at 0: (overlap, union clamped, iou)."""
    def area(boxes: Tensor) -> Tensor:
        return (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)

    lt = torch.max(pred[:, :2], target[:, :2])
    rb = torch.min(pred[:, 2:], target[:, 2:])
    wh = (rb - lt).clamp(min=0)
    overlap = wh[:, 0] * wh[:, 1]
    union = (area(pred) + area(target) - overlap).clamp(min=union_eps)
    return overlap, union, overlap / union


def iou_elementwise(pred: Tensor, target: Tensor, mode: str, eps: float) -> Tensor:
    _, _, ious = box_iou_parts(pred, target, 1e-6)  # bbox_overlaps' own default eps
    ious = ious.clamp(min=eps)
    if mode == "linear":
        return 1 - ious
    if mode == "square":
        return 1 - ious**2
    if mode == "log":
        return -torch.log(ious)
    raise ValueError(mode)


def giou_elementwise(pred: Tensor, target: Tensor, eps: float) -> Tensor:
    _, union, ious = box_iou_parts(pred, target, eps)
    enclose_lt = torch.min(pred[:, :2], target[:, :2])
    enclose_rb = torch.max(pred[:, 2:], target[:, 2:])
    enclose_wh = (enclose_rb - enclose_lt).clamp(min=0)
    enclose = (enclose_wh[:, 0] * enclose_wh[:, 1]).clamp(min=eps)
    return 1 - (ious - (enclose - union) / enclose)


def regression_weight(weight: Tensor, pred: Tensor) -> Tensor:
    """Element weights, or one weight per row of the last axis (the documented extension)."""
    weight = weight.double()
    if weight.dim() + 1 == pred.dim():
        weight = weight.unsqueeze(-1)
    return weight


def box_weight(weight: Tensor) -> Tensor:
    weight = weight.double()
    return weight.mean(-1) if weight.dim() == 2 else weight


def _log_softmax_reference(logits: Tensor) -> Tensor:
    """``x - max - log sum exp(x - max)`` over dim 1: finite where softmax underflows (log of it would be -inf)."""
    shifted = logits - logits.max(dim=1, keepdim=True).values
    return shifted - shifted.exp().sum(dim=1, keepdim=True).log()


def kd_elementwise(pred: Tensor, soft_label: Tensor, T: float) -> Tensor:
    """(N,): (T^2 / C) sum_c p_c (log p_c - log q_c), p = softmax(t / T), q = softmax(s / T), ``0 log 0 = 0``."""
    pred, soft_label = pred.double(), soft_label.double()
    p = _log_softmax_reference(soft_label / T).exp()
    log_q = _log_softmax_reference(pred / T) if pred.numel() else pred
    kl = torch.special.xlogy(p, p) - p * log_q
    return kl.sum(dim=1) / pred.shape[1] * T * T


def ld_elementwise(pred: Tensor, soft_label: Tensor, T: float, reg_max: int) -> Tensor:
    """(N, 4): :func:`kd_elementwise` on each side's (reg_max + 1) bins."""
    n = pred.shape[0]
    rows = kd_elementwise(pred.reshape(n * 4, reg_max + 1), soft_label.reshape(n * 4, reg_max + 1), T)
    return rows.reshape(n, 4)


def kd_reference(pred, soft_label, T, weight=None, reduction="mean", avg_factor=None, loss_weight=1.0):
    """float64 KnowledgeDistillationKLDivLoss with visdet's reduction."""
    w = None if weight is None else weight.double()
    return reduce_reference(kd_elementwise(pred, soft_label, T), w, reduction, avg_factor) * loss_weight


def ld_reference(pred, soft_label, T, reg_max, weight=None, reduction="mean", avg_factor=None, loss_weight=1.0):
    """float64 LocalizationDistillationLoss (weight (N,) or (N, 4)) with visdet's reduction."""
    w = None if weight is None else (weight.double()[:, None] if weight.dim() == 1 else weight.double())
    return reduce_reference(ld_elementwise(pred, soft_label, T, reg_max), w, reduction, avg_factor) * loss_weight


# --- the module-level reference ---------------------------------------------------------------------------------


def resolved_config(cfg: Mapping[str, object]) -> tuple[str, dict[str, object]]:
    """``(type, options)`` with visdet's defaults filled in."""
    options = dict(cfg)
    loss_type = str(options.pop("type"))
    merged = dict(DEFAULTS[loss_type])
    merged.update(options)
    return loss_type, merged


def _float64(value: Optional[Tensor]) -> Optional[Tensor]:
    if value is None or not value.is_floating_point():
        return value
    return value.double()


def reference_loss(
    cfg: Mapping[str, object],
    pred: Tensor,
    target: Union[Tensor, tuple[Tensor, Tensor]],
    weight: Optional[Tensor] = None,
    avg_factor: AvgFactor = None,
    reduction_override: Optional[str] = None,
    ignore_index: Optional[int] = None,
) -> Tensor:
    """The value the loss built from ``cfg`` must return for this call, computed in float64.

    Arguments follow the modules' ``forward``; in CrossEntropyLoss mask mode ``weight`` is the RoI labels.
    ``pred`` may require grad (it is used as given if it is float64, so gradients flow to it).
    """
    loss_type, opt = resolved_config(cfg)
    reduction = reduction_override if reduction_override else str(opt["reduction"])
    loss_weight = float(opt["loss_weight"])  # type: ignore[arg-type]
    pred = pred if pred.dtype == torch.float64 else pred.double()
    if isinstance(target, tuple):
        target = (target[0], target[1].double())
    else:
        target = _float64(target)
    if isinstance(avg_factor, Tensor):
        avg_factor = float(avg_factor)

    if loss_type == "FocalLoss":
        loss = focal_elementwise(pred, target, float(opt["gamma"]), float(opt["alpha"]), bool(opt["activated"]))
        w = None if weight is None else focal_weight_shape(weight.double(), pred)
        out = reduce_reference(loss, w, reduction, avg_factor)
    elif loss_type == "QualityFocalLoss":
        loss = qfl_elementwise(pred, target, float(opt["beta"]), bool(opt["activated"]))
        out = reduce_reference(loss, _float64(weight), reduction, avg_factor)
    elif loss_type == "DistributionFocalLoss":
        reg_max = opt["reg_max"]
        if reg_max is not None and pred.size(1) != int(reg_max) + 1:
            raise ValueError("bins != reg_max + 1")
        loss = dfl_elementwise(pred, target)
        out = reduce_reference(loss, _float64(weight), reduction, avg_factor)
    elif loss_type == "CrossEntropyLoss":
        index = int(opt["ignore_index"]) if opt["ignore_index"] is not None else -100
        if ignore_index is not None:
            index = ignore_index
        cw = opt["class_weight"]
        class_weight = None if cw is None else torch.as_tensor(cw, dtype=torch.float64)
        if opt["use_mask"]:
            labels = weight
            loss = mask_ce_elementwise(pred, target, labels)
            w = None if class_weight is None else class_weight[labels.long().clamp(0, len(class_weight) - 1)].view(
                -1, *[1] * (loss.dim() - 1))  # any weight for the zero rows of RoIs labelled outside the classes
            out = reduce_reference(loss, w, reduction, avg_factor)
        elif opt["use_sigmoid"]:
            loss, element_weight, valid = sigmoid_ce_parts(pred, target, weight, class_weight, index)
            if avg_factor is None and opt["avg_non_ignore"] and reduction == "mean":
                avg_factor = float(valid.sum())
            out = reduce_reference(loss, element_weight, reduction, avg_factor)
        elif target.dim() == pred.dim():
            # class probabilities: nothing to ignore; avg_non_ignore divides by all samples, as "mean" does
            if index >= 0:
                raise ValueError("ignore_index >= 0 with class-probability targets")
            loss = softmax_ce_probabilities_elementwise(pred, target, class_weight)
            out = reduce_reference(loss, _float64(weight), reduction, avg_factor)
        else:
            loss = softmax_ce_elementwise(pred, target, class_weight, index)
            if avg_factor is None and opt["avg_non_ignore"] and reduction == "mean":
                avg_factor = float((target != index).sum())
            out = reduce_reference(loss, _float64(weight), reduction, avg_factor)
    elif loss_type in ("L1Loss", "SmoothL1Loss", "MSELoss", "BalancedL1Loss"):
        diff = (pred - target).abs()
        if loss_type == "L1Loss":
            loss = diff
        elif loss_type == "MSELoss":
            loss = (pred - target) ** 2
        elif loss_type == "SmoothL1Loss":
            loss = smooth_l1_elementwise(diff, float(opt["beta"]))
        else:
            loss = balanced_l1_elementwise(diff, float(opt["alpha"]), float(opt["gamma"]), float(opt["beta"]))
        w = None if weight is None else regression_weight(weight, pred)
        out = reduce_reference(loss, w, reduction, avg_factor)
    elif loss_type == "IoULoss":
        mode = "linear" if opt["linear"] else str(opt["mode"])
        loss = iou_elementwise(pred, target, mode, float(opt["eps"]))
        out = reduce_reference(loss, None if weight is None else box_weight(weight), reduction, avg_factor)
    elif loss_type == "GIoULoss":
        loss = giou_elementwise(pred, target, float(opt["eps"]))
        out = reduce_reference(loss, None if weight is None else box_weight(weight), reduction, avg_factor)
    elif loss_type == "KnowledgeDistillationKLDivLoss":
        out = kd_reference(pred, target, float(opt["T"]), weight, reduction, avg_factor)
    elif loss_type == "LocalizationDistillationLoss":
        out = ld_reference(pred, target, float(opt["T"]), int(opt["reg_max"]), weight, reduction, avg_factor)
    else:
        raise KeyError(f"no reference for {loss_type}")
    return loss_weight * out


# --- shared helpers for the test files -------------------------------------------------------------------------


def clone_inputs(inputs: Mapping[str, Any], dtype: Optional[torch.dtype] = None) -> dict[str, Any]:
    """Detached copies (floating tensors cast to ``dtype`` if given; tuples such as QFL's target element-wise)."""

    def copy(value: Any) -> Any:
        if isinstance(value, tuple):
            return tuple(copy(item) for item in value)
        if not isinstance(value, Tensor):
            return value
        value = value.detach().clone()
        return value.to(dtype) if dtype is not None and value.is_floating_point() else value

    return {name: copy(value) for name, value in inputs.items()}


def grad_of(output: Tensor, wrt: Tensor, grad_output: Optional[Tensor] = None) -> Tensor:
    """d(sum(output * grad_output))/d(wrt), zeros if ``wrt`` does not reach ``output``."""
    if grad_output is None:
        grad_output = torch.full_like(output, 2.0)
    (grad,) = torch.autograd.grad((output * grad_output).sum(), wrt, allow_unused=True)
    return torch.zeros_like(wrt) if grad is None else grad


def strided(x: Any) -> Any:
    """Same values, non-contiguous storage (every other element of a wider buffer); tuples element-wise."""
    if isinstance(x, tuple):
        return tuple(strided(t) for t in x)
    if not isinstance(x, Tensor) or x.dim() == 0:
        return x
    wide = torch.stack([x, torch.zeros_like(x)], dim=-1)
    view = wide[..., 0]
    assert x.numel() <= 1 or not view.is_contiguous()
    return view


def boxes(n: int, seed: int = 0, scale: float = 100.0, dtype: torch.dtype = torch.float64) -> Tensor:
    """Random valid (x1, y1, x2, y2) boxes with sides in [1, 1 + scale / 2]."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * scale
    wh = torch.rand(n, 2, generator=g, dtype=torch.float64) * scale * 0.5 + 1.0
    return torch.cat([xy, xy + wh], dim=1).to(dtype)


def overlapping_boxes(target: Tensor, seed: int = 1, jitter: float = 0.1) -> Tensor:
    """Predictions that overlap their targets well (IoU far from every clamp) for gradient checks."""
    g = torch.Generator().manual_seed(seed)
    wh = (target[:, 2:] - target[:, :2]).repeat(1, 2)
    return target + (torch.rand(target.shape, generator=g, dtype=target.dtype) * 2 - 1) * jitter * wh


def spec_inputs(
    cfg: Mapping[str, object],
    n: int,
    seed: int = 0,
    *,
    variant: Optional[str] = None,
    dtype: torch.dtype = torch.float64,
    logit_range: Optional[float] = None,
) -> dict[str, object]:
    """Inputs drawn with the loss's input spec, keyed as ``forward``'s arguments: pred, target (a
    ``(labels, scores)`` pair for QFL's pair variant), weight (the RoI labels in mask mode), avg_factor."""
    from visdet_export import build_loss
    from visdet_export.specs import SampleOptions, spec_for

    loss = build_loss(dict(cfg))
    spec = spec_for(loss, variant)
    drawn = spec.sample(loss, n, seed=seed, options=SampleOptions(dtype=dtype, logit_range=logit_range))
    target = (drawn["labels"], drawn["scores"]) if "labels" in drawn else drawn.get("target", drawn.get("soft_label"))
    weight = drawn.get("label", drawn.get("weight"))
    return dict(pred=drawn["pred"], target=target, weight=weight, avg_factor=drawn["avg_factor"])
