# RetinaNet (Lin et al., 2017): Focal Loss for classification against the extreme foreground/background
# imbalance, Smooth L1 for box regression. The loss block of the visdet documentation, verbatim (MMDetection's own
# _base_/models/retinanet_r50_fpn.py uses L1Loss(loss_weight=1.0) for loss_bbox).
# Parsed, never executed: only literals, dict(...) and `name = value` are allowed (see visdet_export.config).

loss_cls = dict(
    type="FocalLoss",
    use_sigmoid=True,
    gamma=2.0,
    alpha=0.25,
    loss_weight=1.0,
)
loss_bbox = dict(
    type="SmoothL1Loss",
    beta=1.0,
    loss_weight=1.0,
)
