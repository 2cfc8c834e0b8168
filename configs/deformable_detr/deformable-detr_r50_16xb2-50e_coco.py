# Deformable DETR, multi-scale (strides 8, 16, 32, 64), R50, 50 epochs on COCO.
# Paper: 44.5 AP; mmdet 3.3's config of the same model: 44.3 AP.
_base_ = [
    './_base_/coco_detection.py', './_base_/default_runtime.py', './_base_/schedule_50e.py'
]

# The transformer's layers: d=256, 8 heads, K=4 points per head and level,
# FFN 1024, dropout 0.1. The detector derives every other width from embed_dims (the
# neck's out_channels, the positional encoding's num_feats, the head's embed_dims) and
# the neck's num_outs from num_feature_levels.
transformer_layers = dict(
    num_layers=6, embed_dims=256, num_heads=8, num_points=4, feedforward_channels=1024,
    dropout=0.1)

model = dict(
    type='ddetr.DeformableDETR',
    num_queries=300,
    num_feature_levels=4,
    with_box_refine=False,
    as_two_stage=False,
    data_preprocessor=dict(
        type='DetDataPreprocessor',
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        bgr_to_rgb=True,
        pad_size_divisor=1),
    backbone=dict(
        type='ResNet',
        depth=50,
        num_stages=4,
        out_indices=(1, 2, 3),  # C3, C4, C5
        frozen_stages=1,
        norm_cfg=dict(type='BN', requires_grad=False),
        norm_eval=True,
        style='pytorch',
        init_cfg=dict(type='Pretrained', checkpoint='torchvision://resnet50')),
    neck=dict(
        # 1x1 conv + GroupNorm per level, and a 3x3 stride-2 conv on C5 for the
        # fourth level. bias=True as in the paper's code, so that its released
        # checkpoints convert exactly; mmdet's checkpoints lack these biases,
        # which are zero-initialised (see tools/model_converters/mmdet_to_ours.py).
        type='ChannelMapper',
        in_channels=[512, 1024, 2048],
        kernel_size=1,
        act_cfg=None,
        norm_cfg=dict(type='GN', num_groups=32),
        bias=True),
    encoder=transformer_layers,
    decoder=transformer_layers,
    positional_encoding=dict(normalize=True, offset=-0.5),
    bbox_head=dict(
        type='ddetr.DeformableDETRHead',
        num_classes=80,
        # The paper's set loss: focal (weight 2), L1 (5) and GIoU (2), the defaults of
        # SetCriterion (change them here: loss_cls=dict(...), loss_bbox, loss_iou).
        criterion=dict(type='ddetr.SetCriterion', sync_cls_avg_factor=True)),
    # Matching costs weigh like the losses.
    train_cfg=dict(
        assigner=dict(type='ddetr.HungarianAssigner', cls_weight=2.0, l1_weight=5.0,
                      giou_weight=2.0)),
    test_cfg=dict(max_per_img=100))
