# Mask R-CNN (He et al., 2017): Faster R-CNN plus a mask head trained with the per-RoI binary mask
# cross-entropy (the logits of each RoI's ground-truth class), as in MMDetection's mask-rcnn_r50_fpn config.

rpn_head = dict(
    loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=1.0),
    loss_bbox=dict(type="L1Loss", loss_weight=1.0),
)
roi_head = dict(
    bbox_head=dict(
        loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
        loss_bbox=dict(type="L1Loss", loss_weight=1.0),
    ),
    mask_head=dict(
        loss_mask=dict(type="CrossEntropyLoss", use_mask=True, loss_weight=1.0),
    ),
)
