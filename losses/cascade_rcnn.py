# Cascade R-CNN (Cai and Vasconcelos, 2018): an RPN with Smooth L1 and three RoI box heads of rising IoU
# thresholds, each with softmax cross-entropy + Smooth L1, as in MMDetection's cascade-rcnn_r50_fpn config.
# The heads form a list, so their losses are named roi_head.bbox_head.0.loss_cls, ..., bbox_head.2.loss_bbox.

rpn_head = dict(
    loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=1.0),
    # MMDetection writes beta=1.0 / 9.0; configs here hold literals only.
    loss_bbox=dict(type="SmoothL1Loss", beta=0.1111111111111111, loss_weight=1.0),
)
roi_head = dict(
    bbox_head=[
        dict(
            loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
            loss_bbox=dict(type="SmoothL1Loss", beta=1.0, loss_weight=1.0),
        ),
        dict(
            loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
            loss_bbox=dict(type="SmoothL1Loss", beta=1.0, loss_weight=1.0),
        ),
        dict(
            loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
            loss_bbox=dict(type="SmoothL1Loss", beta=1.0, loss_weight=1.0),
        ),
    ],
)
