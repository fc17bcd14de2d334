# RPN, the Region Proposal Network (Ren et al., 2015): a sigmoid cross-entropy for objectness and L1 on the
# box deltas, as in MMDetection's rpn_r50_fpn config.

rpn_head = dict(
    loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=1.0),
    loss_bbox=dict(type="L1Loss", loss_weight=1.0),
)
