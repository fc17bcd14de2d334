# FSAF (Zhu et al., 2019): Focal Loss and IoU Loss left unreduced (reduction="none"), because the head picks
# the feature level of each instance from the per-anchor losses, as in MMDetection's fsaf_r50_fpn config.

loss_cls = dict(
    type="FocalLoss",
    use_sigmoid=True,
    gamma=2.0,
    alpha=0.25,
    loss_weight=1.0,
    reduction="none",
)
loss_bbox = dict(type="IoULoss", eps=0.0001, loss_weight=1.0, reduction="none")
