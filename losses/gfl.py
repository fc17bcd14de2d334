# GFL, Generalized Focal Loss (Li et al., 2020): Quality Focal Loss joins classification and localization
# quality, Distribution Focal Loss learns the box-edge distributions, GIoU Loss regresses the boxes.
# The loss block of the visdet documentation, verbatim.

loss_cls = dict(
    type="QualityFocalLoss",
    use_sigmoid=True,
    beta=2.0,
    loss_weight=1.0,
)
loss_bbox = dict(
    type="GIoULoss",
    loss_weight=2.0,
)
loss_dfl = dict(
    type="DistributionFocalLoss",
    loss_weight=0.25,
)
