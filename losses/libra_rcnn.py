# Libra R-CNN (Pang et al., 2019): Faster R-CNN with the Balanced L1 Loss on the RoI box head, as in
# MMDetection's libra-faster-rcnn_r50_fpn config.

rpn_head = dict(
    loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=1.0),
    loss_bbox=dict(type="L1Loss", loss_weight=1.0),
)
roi_head = dict(
    bbox_head=dict(
        loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
        loss_bbox=dict(type="BalancedL1Loss", alpha=0.5, gamma=1.5, beta=1.0, loss_weight=1.0),
    ),
)
