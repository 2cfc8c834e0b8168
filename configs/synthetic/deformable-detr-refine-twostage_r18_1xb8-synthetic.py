# Deformable DETR (iterative box refinement + two-stage) sized for the CPU demo: a
# ResNet-18 trained from scratch on the synthetic shapes (128 px), a narrow transformer
# (d=128, FFN 256, 2 encoder and 3 decoder layers, 4 levels) and 50 queries. Two-stage
# initialises the queries from the encoder's best proposals, which is what lets a
# from-scratch model converge within a few CPU minutes; see docs/demo.md.
_base_ = './_base_/synthetic-shapes_128.py'

custom_imports = dict(imports=['projects.deformable_detr'], allow_failed_imports=False)

embed_dims = 128
num_levels = 4
transformer_layers = dict(
    num_layers=2, embed_dims=embed_dims, num_heads=8, num_points=4,
    # FFN 2x, not the paper's 4x: 4-9 % less an iteration, the same mAP (docs/demo.md)
    feedforward_channels=2 * embed_dims, dropout=0.0)
model = dict(
    type='ddetr.DeformableDETR',
    num_queries=50,  # <= 6 objects an image: plenty of slack for the matching
    num_feature_levels=num_levels,
    with_box_refine=True,
    as_two_stage=True,
    data_preprocessor=dict(
        type='DetDataPreprocessor',
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        bgr_to_rgb=True,
        pad_size_divisor=1),
    backbone=dict(
        type='ResNet',
        depth=18,
        # half-width ResNet-18 (32..256 channels): a quarter of the FLOPs, plenty
        # for shapes, and the backbone is most of the CPU time
        base_channels=32,
        num_stages=4,
        out_indices=(1, 2, 3),  # strides 8, 16, 32
        frozen_stages=-1,
        # from scratch: BN must learn its statistics and affine parameters
        norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=False,
        style='pytorch',
        init_cfg=None),
    neck=dict(
        type='ChannelMapper',
        in_channels=[64, 128, 256],
        kernel_size=1,
        act_cfg=None,
        # out_channels (embed_dims) and num_outs (num_levels: + one stride-64 level
        # from a 3x3 stride-2 conv) are derived by the detector
        norm_cfg=dict(type='GN', num_groups=32)),
    encoder=transformer_layers,
    decoder=dict(transformer_layers, num_layers=3),
    positional_encoding=dict(normalize=True, offset=-0.5),
    bbox_head=dict(
        type='ddetr.DeformableDETRHead',
        num_classes=5,
        # The paper's set loss: focal (weight 2), L1 (5) and GIoU (2), the defaults of
        # SetCriterion (change them here: loss_cls=dict(...), loss_bbox, loss_iou).
        criterion=dict(type='ddetr.SetCriterion', sync_cls_avg_factor=True)),
    train_cfg=dict(
        assigner=dict(type='ddetr.HungarianAssigner', cls_weight=2.0, l1_weight=5.0,
                      giou_weight=2.0)),
    test_cfg=dict(max_per_img=100))

# The paper's AdamW with x0.1 lr for the sampling offsets and reference points, but the
# backbone at full lr (it starts from random weights) and a larger base lr and gradient
# clip: a small model, a small batch and a budget of minutes. lr 8e-4 over 7 epochs
# reaches what 4e-4 reached in 8 (1.6e-3 is worse; docs/demo.md).
optim_wrapper = dict(
    type='OptimWrapper',
    # fused: one kernel a parameter group; the default loops over the parameters, op by
    # op (51 ms a demo step against 39 ms fused on 2 cores: docs/demo.md)
    optimizer=dict(type='AdamW', lr=8e-4, weight_decay=1e-4, fused=True),
    clip_grad=dict(max_norm=1.0, norm_type=2),
    # the parameters that share their lr in one group (2 groups, not one per parameter:
    # the optimizer step took 10-11 ms, not 17-19)
    constructor='GroupedOptimWrapperConstructor',
    paramwise_cfg=dict(custom_keys={
        'sampling_offsets': dict(lr_mult=0.1),
        'reference_points': dict(lr_mult=0.1)
    }))

max_epochs = 7
# validated after epochs 2, 4, 6 and 7 (the last always): 3.5 s each
train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=max_epochs, val_interval=2)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=200),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True,
         milestones=[6], gamma=0.1)
]
auto_scale_lr = dict(base_batch_size=8, enable=False)
