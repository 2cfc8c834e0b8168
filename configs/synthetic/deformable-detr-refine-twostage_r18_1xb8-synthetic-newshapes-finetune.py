# Fine-tuning the demo's model (`make demo` writes work_dirs/demo/epoch_7.pth: five
# shapes) on three shapes it has never seen: diamond, hexagon, ring. Every tensor of the
# checkpoint is loaded except the class branches (5 -> 3 classes), which keep the model's
# initialisation; ddetr.FineTuneHook logs each by name with both shapes, and refuses any
# other mismatch (projects/deformable_detr/checkpoint/class_branches.py). The data:
#
#   python tools/dataset_converters/synthetic_coco.py --out data/synthetic_newshapes \
#       --classes diamond hexagon ring --num-train 1000 --num-val 200 --seed 1
#   python tools/train.py \
#       configs/synthetic/deformable-detr-refine-twostage_r18_1xb8-synthetic-newshapes-finetune.py
_base_ = './deformable-detr-refine-twostage_r18_1xb8-synthetic.py'

load_from = 'work_dirs/demo/epoch_7.pth'
custom_hooks = [dict(type='ddetr.FineTuneHook')]

data_root = 'data/synthetic_newshapes/'
metainfo = dict(classes=('diamond', 'hexagon', 'ring'),
                palette=[(230, 120, 20), (40, 170, 170), (200, 60, 160)])
model = dict(bbox_head=dict(num_classes=3))  # len(metainfo['classes'])

train_dataloader = dict(dataset=dict(data_root=data_root, metainfo=metainfo))
val_dataloader = dict(dataset=dict(data_root=data_root, metainfo=metainfo))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/val.json')
test_evaluator = val_evaluator

# Shorter than training from scratch: the backbone, the transformer and the box and
# proposal branches start trained; a short warm-up lets the new class branches catch up
# before the full learning rate moves the rest.
max_epochs = 4
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=50),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[3],
         gamma=0.1)
]
