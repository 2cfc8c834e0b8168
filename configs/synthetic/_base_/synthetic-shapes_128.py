# Synthetic shapes data set (tools/dataset_converters/synthetic_coco.py), 128x128 images,
# and a CPU-sized runtime shared by the synthetic configs. mmdet's pipeline, CocoDataset
# and CocoMetric (as ddetr.CocoDataset and ddetr.CocoMetric: checked for broken files and
# annotations, see docs/datasets.md): only the class names differ from COCO.
_base_ = '../../deformable_detr/_base_/default_runtime.py'

dataset_type = 'ddetr.CocoDataset'
data_root = 'data/synthetic/'
metainfo = dict(
    classes=('circle', 'square', 'triangle', 'cross', 'star'),
    palette=[(220, 20, 60), (0, 130, 230), (0, 200, 80), (250, 170, 30), (160, 60, 220)])
backend_args = None
img_scale = (128, 128)

train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(
    batch_size=8,
    # 128 px jpegs decode in ~0.1 ms: worker processes would only compete for 2 cores
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='DefaultSampler', shuffle=True),
    batch_sampler=dict(type='AspectRatioBatchSampler'),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/train.json',
        data_prefix=dict(img='train/'),
        filter_cfg=dict(filter_empty_gt=False, min_size=1),
        pipeline=train_pipeline,
        backend_args=backend_args))
val_dataloader = dict(
    batch_size=8,
    num_workers=0,
    persistent_workers=False,
    drop_last=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/val.json',
        data_prefix=dict(img='val/'),
        test_mode=True,
        pipeline=test_pipeline,
        backend_args=backend_args))
test_dataloader = val_dataloader
val_evaluator = dict(
    type='ddetr.CocoMetric',
    ann_file=data_root + 'annotations/val.json',
    metric='bbox',
    format_only=False,
    backend_args=backend_args)
test_evaluator = val_evaluator

# runtime: the COCO configs' (hooks, visualizer, env), with a shorter log interval (loss,
# lr, time and ETA every 20 iterations) and only the last and the best checkpoint kept.
default_hooks = dict(
    logger=dict(interval=20),
    checkpoint=dict(max_keep_ckpts=1, save_best='coco/bbox_mAP', rule='greater'))
log_processor = dict(window_size=20)
randomness = dict(seed=0)
