# ATSS (Zhang et al., 2020): Focal Loss for classification, GIoU Loss for box regression and a sigmoid
# cross-entropy for centerness. The loss block of the visdet documentation, verbatim.

loss_cls = dict(
    type="FocalLoss",
    use_sigmoid=True,
    gamma=2.0,
    alpha=0.25,
    loss_weight=1.0,
)
loss_bbox = dict(
    type="GIoULoss",
    loss_weight=2.0,
)
loss_centerness = dict(
    type="CrossEntropyLoss",
    use_sigmoid=True,
    loss_weight=1.0,
)
