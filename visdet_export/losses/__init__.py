"""The visdet detection losses, each a pure function plus a thin ``nn.Module``."""

from .balanced_l1_loss import BalancedL1Loss, balanced_l1_loss
from .cross_entropy_loss import CrossEntropyLoss, binary_cross_entropy, mask_cross_entropy, softmax_cross_entropy
from .focal_loss import FocalLoss, sigmoid_focal_loss
from .gfocal_loss import (
    DistributionFocalLoss,
    QualityFocalLoss,
    distribution_focal_loss,
    quality_focal_loss,
    quality_focal_loss_on_labels,
)
from .iou_loss import GIoULoss, IoULoss, giou_loss, iou_loss
from .kd_loss import (
    KnowledgeDistillationKLDivLoss,
    LocalizationDistillationLoss,
    knowledge_distillation_kl_div_loss,
    localization_distillation_loss,
)
from .mse_loss import MSELoss, mse_loss
from .smooth_l1_loss import L1Loss, SmoothL1Loss, l1_loss, smooth_l1_loss

LOSS_CLASSES = (
    CrossEntropyLoss,
    FocalLoss,
    QualityFocalLoss,
    DistributionFocalLoss,
    L1Loss,
    SmoothL1Loss,
    MSELoss,
    BalancedL1Loss,
    IoULoss,
    GIoULoss,
    KnowledgeDistillationKLDivLoss,
    LocalizationDistillationLoss,
)

# a literal list: type checkers read it as the module's exports
__all__ = [
    "BalancedL1Loss",
    "CrossEntropyLoss",
    "DistributionFocalLoss",
    "FocalLoss",
    "GIoULoss",
    "IoULoss",
    "KnowledgeDistillationKLDivLoss",
    "L1Loss",
    "LOSS_CLASSES",
    "LocalizationDistillationLoss",
    "MSELoss",
    "QualityFocalLoss",
    "SmoothL1Loss",
    "balanced_l1_loss",
    "binary_cross_entropy",
    "distribution_focal_loss",
    "giou_loss",
    "iou_loss",
    "knowledge_distillation_kl_div_loss",
    "l1_loss",
    "localization_distillation_loss",
    "mask_cross_entropy",
    "mse_loss",
    "quality_focal_loss",
    "quality_focal_loss_on_labels",
    "sigmoid_focal_loss",
    "smooth_l1_loss",
    "softmax_cross_entropy",
]
