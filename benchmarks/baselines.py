"""MMDetection-style eager baselines, written from the formulas the way the reference libraries do it.

These mirror visdet / MMDetection 3.x ``mmdet/models/losses`` on CPU (where ``FocalLoss`` takes the pure-PyTorch
path): ``F.one_hot`` + ``pow`` for focal loss, ``nonzero`` + index writes for quality focal loss and sigmoid
cross-entropy label expansion, ``F.cross_entropy`` / ``F.binary_cross_entropy_with_logits`` for the
cross-entropies, ``bbox_overlaps`` for IoU losses, and ``weight_reduce_loss`` for weighting and reduction.
They are benchmark references only: no NaN masking, no export constraints.

Every baseline has the signature ``baseline(loss_module, inputs: dict[str, Tensor]) -> Tensor`` and reads its
hyper-parameters from the configured ``loss_module`` (so it tracks the representative configuration), with the
inputs drawn by :func:`visdet_export.specs.spec_for` (``pred``, ``target`` ..., ``weight``, ``avg_factor``).
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Baseline = Callable[[nn.Module, Mapping[str, Tensor]], Tensor]


# --- mmdet/models/losses/utils.py ------------------------------------------------------------------------------


def reduce_loss(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return loss
    if reduction == "mean":
        return loss.mean()
    return loss.sum()


def weight_reduce_loss(loss: Tensor, weight: Optional[Tensor] = None, reduction: str = "mean", avg_factor=None):
    if weight is not None:
        loss = loss * weight
    if avg_factor is None:
        return reduce_loss(loss, reduction)
    if reduction == "mean":
        eps = torch.finfo(torch.float32).eps
        return loss.sum() / (avg_factor + eps)
    if reduction != "none":
        raise ValueError('avg_factor can not be used with reduction="sum"')
    return loss


# --- focal_loss.py ---------------------------------------------------------------------------------------------


def py_sigmoid_focal_loss(pred, target, weight=None, gamma=2.0, alpha=0.25, reduction="mean", avg_factor=None):
    pred_sigmoid = pred.sigmoid()
    target = target.type_as(pred)
    pt = (1 - pred_sigmoid) * target + pred_sigmoid * (1 - target)
    focal_weight = (alpha * target + (1 - alpha) * (1 - target)) * pt.pow(gamma)
    loss = F.binary_cross_entropy_with_logits(pred, target, reduction="none") * focal_weight
    if weight is not None:
        if weight.shape != loss.shape:
            if weight.size(0) == loss.size(0):
                weight = weight.view(-1, 1)
            else:
                weight = weight.view(loss.size(0), -1)
    return weight_reduce_loss(loss, weight, reduction, avg_factor)


def py_focal_loss_with_prob(pred, target, weight=None, gamma=2.0, alpha=0.25, reduction="mean", avg_factor=None):
    if pred.dim() != target.dim():
        num_classes = pred.size(1)
        target = F.one_hot(target, num_classes=num_classes + 1)
        target = target[:, :num_classes]
    target = target.type_as(pred)
    pt = (1 - pred) * target + pred * (1 - target)
    focal_weight = (alpha * target + (1 - alpha) * (1 - target)) * pt.pow(gamma)
    loss = F.binary_cross_entropy(pred, target, reduction="none") * focal_weight
    if weight is not None:
        if weight.shape != loss.shape:
            if weight.size(0) == loss.size(0):
                weight = weight.view(-1, 1)
            else:
                weight = weight.view(loss.size(0), -1)
    return weight_reduce_loss(loss, weight, reduction, avg_factor)


def focal(module: nn.Module, inputs: Mapping[str, Tensor]) -> Tensor:
    pred, target = inputs["pred"], inputs["target"]
    args = (inputs.get("weight"), module.gamma, module.alpha, module.reduction, inputs.get("avg_factor"))
    if module.activated:
        return module.loss_weight * py_focal_loss_with_prob(pred, target, *args)
    if pred.dim() != target.dim():
        num_classes = pred.size(1)
        target = F.one_hot(target, num_classes=num_classes + 1)
        target = target[:, :num_classes]
    return module.loss_weight * py_sigmoid_focal_loss(pred, target, *args)


# --- gfocal_loss.py --------------------------------------------------------------------------------------------


def quality_focal_loss(pred, target, beta=2.0):
    label, score = target
    pred_sigmoid = pred.sigmoid()
    scale_factor = pred_sigmoid
    zerolabel = scale_factor.new_zeros(pred.shape)
    loss = F.binary_cross_entropy_with_logits(pred, zerolabel, reduction="none") * scale_factor.pow(beta)
    bg_class_ind = pred.size(1)
    pos = ((label >= 0) & (label < bg_class_ind)).nonzero().squeeze(1)
    pos_label = label[pos].long()
    scale_factor = score[pos] - pred_sigmoid[pos, pos_label]
    loss[pos, pos_label] = F.binary_cross_entropy_with_logits(
        pred[pos, pos_label], score[pos], reduction="none"
    ) * scale_factor.abs().pow(beta)
    return loss.sum(dim=1, keepdim=False)


def quality_focal_loss_tensor_target(pred, target, beta=2.0, activated=False):
    if activated:
        pred_sigmoid = pred
        loss_function = F.binary_cross_entropy
    else:
        pred_sigmoid = pred.sigmoid()
        loss_function = F.binary_cross_entropy_with_logits
    scale_factor = pred_sigmoid
    target = target.type_as(pred)
    zerolabel = scale_factor.new_zeros(pred.shape)
    loss = loss_function(pred, zerolabel, reduction="none") * scale_factor.pow(beta)
    pos = target != 0
    scale_factor = target - pred_sigmoid
    loss[pos] = loss_function(pred[pos], target[pos], reduction="none") * scale_factor[pos].abs().pow(beta)
    return loss.sum(dim=1, keepdim=False)


def quality_focal_loss_with_prob(pred, target, beta=2.0):
    label, score = target
    pred_sigmoid = pred
    scale_factor = pred_sigmoid
    zerolabel = scale_factor.new_zeros(pred.shape)
    loss = F.binary_cross_entropy(pred, zerolabel, reduction="none") * scale_factor.pow(beta)
    bg_class_ind = pred.size(1)
    pos = ((label >= 0) & (label < bg_class_ind)).nonzero().squeeze(1)
    pos_label = label[pos].long()
    scale_factor = score[pos] - pred_sigmoid[pos, pos_label]
    loss[pos, pos_label] = F.binary_cross_entropy(
        pred[pos, pos_label], score[pos], reduction="none"
    ) * scale_factor.abs().pow(beta)
    return loss.sum(dim=1, keepdim=False)


def qfl(module: nn.Module, inputs: Mapping[str, Tensor]) -> Tensor:
    pred = inputs["pred"]
    if "target" in inputs:
        loss = quality_focal_loss_tensor_target(pred, inputs["target"], module.beta, module.activated)
    elif module.activated:
        loss = quality_focal_loss_with_prob(pred, (inputs["labels"], inputs["scores"]), module.beta)
    else:
        loss = quality_focal_loss(pred, (inputs["labels"], inputs["scores"]), module.beta)
    loss = weight_reduce_loss(loss, inputs.get("weight"), module.reduction, inputs.get("avg_factor"))
    return module.loss_weight * loss


def dfl(module: nn.Module, inputs: Mapping[str, Tensor]) -> Tensor:
    pred, label = inputs["pred"], inputs["target"]
    dis_left = label.long()
    dis_right = dis_left + 1
    weight_left = dis_right.float() - label
    weight_right = label - dis_left.float()
    loss = (
        F.cross_entropy(pred, dis_left, reduction="none") * weight_left
        + F.cross_entropy(pred, dis_right, reduction="none") * weight_right
    )
    loss = weight_reduce_loss(loss, inputs.get("weight"), module.reduction, inputs.get("avg_factor"))
    return module.loss_weight * loss


# --- cross_entropy_loss.py -------------------------------------------------------------------------------------


def cross_entropy(pred, label, weight=None, reduction="mean", avg_factor=None, class_weight=None,
                  ignore_index=-100, avg_non_ignore=False):
    ignore_index = -100 if ignore_index is None else ignore_index
    loss = F.cross_entropy(pred, label, weight=class_weight, reduction="none", ignore_index=ignore_index)
    if (avg_factor is None) and avg_non_ignore and reduction == "mean":
        avg_factor = label.numel() - (label == ignore_index).sum().item()
    if weight is not None:
        weight = weight.float()
    return weight_reduce_loss(loss, weight=weight, reduction=reduction, avg_factor=avg_factor)


def _expand_onehot_labels(labels, label_weights, label_channels, ignore_index):
    bin_labels = labels.new_full((labels.size(0), label_channels), 0)
    valid_mask = (labels >= 0) & (labels != ignore_index)
    inds = torch.nonzero(valid_mask & (labels < label_channels), as_tuple=False)
    if inds.numel() > 0:
        bin_labels[inds, labels[inds]] = 1
    valid_mask = valid_mask.view(-1, 1).expand(labels.size(0), label_channels).float()
    if label_weights is None:
        bin_label_weights = valid_mask
    else:
        bin_label_weights = label_weights.view(-1, 1).repeat(1, label_channels)
        bin_label_weights *= valid_mask
    return bin_labels, bin_label_weights, valid_mask


def binary_cross_entropy(pred, label, weight=None, reduction="mean", avg_factor=None, class_weight=None,
                         ignore_index=-100, avg_non_ignore=False):
    ignore_index = -100 if ignore_index is None else ignore_index
    if pred.dim() != label.dim():
        label, weight, valid_mask = _expand_onehot_labels(label, weight, pred.size(-1), ignore_index)
    else:
        valid_mask = ((label >= 0) & (label != ignore_index)).float()
        if weight is not None:
            weight = weight * valid_mask
        else:
            weight = valid_mask
    if (avg_factor is None) and avg_non_ignore and reduction == "mean":
        avg_factor = valid_mask.sum().item()
    weight = weight.float()
    loss = F.binary_cross_entropy_with_logits(pred, label.float(), pos_weight=class_weight, reduction="none")
    return weight_reduce_loss(loss, weight, reduction=reduction, avg_factor=avg_factor)


def mask_cross_entropy(pred, target, label, reduction="mean", avg_factor=None, class_weight=None, ignore_index=None,
                       **kwargs):
    num_rois = pred.size()[0]
    inds = torch.arange(0, num_rois, dtype=torch.long, device=pred.device)
    pred_slice = pred[inds, label].squeeze(1)
    return F.binary_cross_entropy_with_logits(pred_slice, target, weight=class_weight, reduction="mean")[None]


def ce(module: nn.Module, inputs: Mapping[str, Tensor]) -> Tensor:
    class_weight = module.class_weight
    if class_weight is not None:
        class_weight = class_weight.to(inputs["pred"])  # CrossEntropyLoss.forward: pred.new_tensor(class_weight)
    if module.use_mask:
        loss = mask_cross_entropy(inputs["pred"], inputs["target"], inputs["label"], class_weight=class_weight)
        return module.loss_weight * loss
    fn = binary_cross_entropy if module.use_sigmoid else cross_entropy
    loss = fn(
        inputs["pred"], inputs["target"], inputs.get("weight"), module.reduction, inputs.get("avg_factor"),
        class_weight, module.ignore_index, module.avg_non_ignore,
    )
    return module.loss_weight * loss


# --- smooth_l1_loss.py, mse_loss.py, balanced_l1_loss.py --------------------------------------------------------


def _regression(elementwise: Callable[[nn.Module, Tensor, Tensor], Tensor]) -> Baseline:
    def baseline(module: nn.Module, inputs: Mapping[str, Tensor]) -> Tensor:
        pred, target = inputs["pred"], inputs["target"]
        if target.numel() == 0:
            return pred.sum() * 0
        loss = elementwise(module, pred, target)
        loss = weight_reduce_loss(loss, inputs.get("weight"), module.reduction, inputs.get("avg_factor"))
        return module.loss_weight * loss

    return baseline


def _l1(module, pred, target):
    return torch.abs(pred - target)


def _smooth_l1(module, pred, target):
    beta = module.beta
    diff = torch.abs(pred - target)
    return torch.where(diff < beta, 0.5 * diff * diff / beta, diff - 0.5 * beta)


def _mse(module, pred, target):
    return F.mse_loss(pred, target, reduction="none")


def _balanced_l1(module, pred, target):
    alpha, gamma, beta = module.alpha, module.gamma, module.beta
    diff = torch.abs(pred - target)
    b = math.e ** (gamma / alpha) - 1
    return torch.where(
        diff < beta,
        alpha / b * (b * diff + 1) * torch.log(b * diff / beta + 1) - alpha * diff,
        gamma * diff + gamma / b - alpha * beta,
    )


# --- iou_loss.py + mmdet/structures/bbox/bbox_overlaps.py -------------------------------------------------------


def bbox_overlaps_aligned(bboxes1, bboxes2, mode="iou", eps=1e-6):
    area1 = (bboxes1[..., 2] - bboxes1[..., 0]) * (bboxes1[..., 3] - bboxes1[..., 1])
    area2 = (bboxes2[..., 2] - bboxes2[..., 0]) * (bboxes2[..., 3] - bboxes2[..., 1])
    lt = torch.max(bboxes1[..., :2], bboxes2[..., :2])
    rb = torch.min(bboxes1[..., 2:], bboxes2[..., 2:])
    wh = (rb - lt).clamp(min=0)
    overlap = wh[..., 0] * wh[..., 1]
    union = area1 + area2 - overlap
    if mode == "giou":
        enclosed_lt = torch.min(bboxes1[..., :2], bboxes2[..., :2])
        enclosed_rb = torch.max(bboxes1[..., 2:], bboxes2[..., 2:])
    eps_t = union.new_tensor([eps])
    union = torch.max(union, eps_t)
    ious = overlap / union
    if mode == "iou":
        return ious
    enclose_wh = (enclosed_rb - enclosed_lt).clamp(min=0)
    enclose_area = enclose_wh[..., 0] * enclose_wh[..., 1]
    enclose_area = torch.max(enclose_area, eps_t)
    return ious - (enclose_area - union) / enclose_area


def _box_weight(pred: Tensor, weight: Optional[Tensor]) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """IoULoss/GIoULoss.forward: all-zero weights return early (a host sync); (N, 4) weights are averaged."""
    if weight is not None and not torch.any(weight > 0):
        if pred.dim() == weight.dim() + 1:
            weight = weight.unsqueeze(1)
        return weight, (pred * weight).sum()
    if weight is not None and weight.dim() > 1:
        weight = weight.mean(-1)
    return weight, None


def iou(module: nn.Module, inputs: Mapping[str, Tensor]) -> Tensor:
    pred, target = inputs["pred"], inputs["target"]
    weight, early = _box_weight(pred, inputs.get("weight"))
    if early is not None:
        return early
    ious = bbox_overlaps_aligned(pred, target).clamp(min=module.eps)
    if module.mode == "linear":
        loss = 1 - ious
    elif module.mode == "square":
        loss = 1 - ious**2
    else:
        loss = -ious.log()
    loss = weight_reduce_loss(loss, weight, module.reduction, inputs.get("avg_factor"))
    return module.loss_weight * loss


def giou(module: nn.Module, inputs: Mapping[str, Tensor]) -> Tensor:
    pred, target = inputs["pred"], inputs["target"]
    weight, early = _box_weight(pred, inputs.get("weight"))
    if early is not None:
        return early
    gious = bbox_overlaps_aligned(pred, target, mode="giou", eps=module.eps)
    loss = weight_reduce_loss(1 - gious, weight, module.reduction, inputs.get("avg_factor"))
    return module.loss_weight * loss


# --- kd_loss.py (and LDHead's reshape for localization distillation) ---------------------------------------------


def knowledge_distillation_kl_div_loss(pred, soft_label, T, detach_target=True):
    target = F.softmax(soft_label / T, dim=1)
    if detach_target:
        target = target.detach()
    return F.kl_div(F.log_softmax(pred / T, dim=1), target, reduction="none").mean(1) * (T * T)


def kd(module: nn.Module, inputs: Mapping[str, Tensor]) -> Tensor:
    loss = knowledge_distillation_kl_div_loss(inputs["pred"], inputs["soft_label"], module.T)
    loss = weight_reduce_loss(loss, inputs.get("weight"), module.reduction, inputs.get("avg_factor"))
    return module.loss_weight * loss


def ld(module: nn.Module, inputs: Mapping[str, Tensor]) -> Tensor:
    """LDHead: both distributions reshaped to (N * 4, reg_max + 1), each box's weight repeated per side."""
    bins = module.reg_max + 1
    pred = inputs["pred"].reshape(-1, bins)
    soft = inputs["soft_label"].reshape(-1, bins)
    weight = inputs.get("weight")
    if weight is not None:
        weight = weight[:, None].expand(-1, 4).reshape(-1)
    loss = knowledge_distillation_kl_div_loss(pred, soft, module.T)
    loss = weight_reduce_loss(loss, weight, module.reduction, inputs.get("avg_factor"))
    return module.loss_weight * loss


BASELINES: dict[str, Baseline] = {
    "KnowledgeDistillationKLDivLoss": kd,
    "LocalizationDistillationLoss": ld,
    "FocalLoss": focal,
    "QualityFocalLoss": qfl,
    "DistributionFocalLoss": dfl,
    "CrossEntropyLoss": ce,
    "L1Loss": _regression(_l1),
    "SmoothL1Loss": _regression(_smooth_l1),
    "MSELoss": _regression(_mse),
    "BalancedL1Loss": _regression(_balanced_l1),
    "IoULoss": iou,
    "GIoULoss": giou,
}


def baseline_for(module: nn.Module) -> Baseline:
    """The MMDetection-style baseline of a built loss module."""
    name = type(module).__name__
    if name not in BASELINES:
        raise KeyError(f"no MMDetection-style baseline for {name}; add one to benchmarks/baselines.py")
    return BASELINES[name]
