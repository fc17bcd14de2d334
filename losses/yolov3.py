# YOLOv3 (Redmon and Farhadi, 2018): sigmoid cross-entropies for class, objectness and the xy offsets, MSE for
# the log-scale wh, all summed, as in MMDetection's yolov3_d53 config.

loss_cls = dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=1.0, reduction="sum")
loss_conf = dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=1.0, reduction="sum")
loss_xy = dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=2.0, reduction="sum")
loss_wh = dict(type="MSELoss", loss_weight=2.0, reduction="sum")
