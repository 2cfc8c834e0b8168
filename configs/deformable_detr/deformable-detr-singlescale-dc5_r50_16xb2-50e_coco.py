# Single scale, DC5: the last ResNet stage dilated instead of strided, so C5 has
# stride 16. Paper: 41.5 AP. DilatedResNet dilates that stage as torchvision does
# (its first block undilated), as the paper's code and checkpoint do.
_base_ = './deformable-detr-singlescale_r50_16xb2-50e_coco.py'
model = dict(
    backbone=dict(type='ddetr.DilatedResNet', strides=(1, 2, 2, 1), dilations=(1, 1, 1, 2)))
