# TOOD (Feng et al., 2021): Focal Loss on probabilities (activated=True) for the warm-up epochs, then Quality
# Focal Loss on probabilities, and GIoU Loss, as in MMDetection's tood_r50_fpn config.

initial_loss_cls = dict(
    type="FocalLoss",
    use_sigmoid=True,
    activated=True,
    gamma=2.0,
    alpha=0.25,
    loss_weight=1.0,
)
loss_cls = dict(
    type="QualityFocalLoss",
    use_sigmoid=True,
    activated=True,
    beta=2.0,
    loss_weight=1.0,
)
loss_bbox = dict(type="GIoULoss", loss_weight=2.0)
