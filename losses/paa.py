# PAA, Probabilistic Anchor Assignment (Kim and Lee, 2020): Focal Loss, GIoU Loss and a sigmoid cross-entropy
# for the IoU prediction, as in MMDetection's paa_r50_fpn config.

loss_cls = dict(
    type="FocalLoss",
    use_sigmoid=True,
    gamma=2.0,
    alpha=0.25,
    loss_weight=1.0,
)
loss_bbox = dict(type="GIoULoss", loss_weight=1.3)
loss_centerness = dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=0.5)
