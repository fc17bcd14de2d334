# Faster R-CNN (Ren et al., 2015): the RPN (sigmoid cross-entropy + L1) and the RoI box head (softmax
# cross-entropy over C + 1 classes + L1), as in MMDetection's faster-rcnn_r50_fpn config.

rpn_head = dict(
    loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=1.0),
    loss_bbox=dict(type="L1Loss", loss_weight=1.0),
)
roi_head = dict(
    bbox_head=dict(
        loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
        loss_bbox=dict(type="L1Loss", loss_weight=1.0),
    ),
)
