# Single scale: C5 (stride 32) only, one feature level. Paper: 39.4 AP.
_base_ = './deformable-detr_r50_16xb2-50e_coco.py'
model = dict(
    num_feature_levels=1,
    backbone=dict(out_indices=(3, )),
    neck=dict(in_channels=[2048]))
