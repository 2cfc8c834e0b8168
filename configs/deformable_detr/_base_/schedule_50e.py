# The paper's schedule: AdamW 2e-4 (x0.1 for the backbone and for the
# sampling-offset and reference-point projections), weight decay 1e-4,
# gradient clipping at 0.1, 50 epochs with a x0.1 drop at epoch 40.
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=2e-4, weight_decay=1e-4),
    clip_grad=dict(max_norm=0.1, norm_type=2),
    # one parameter group per lr (2), not one per parameter as MMEngine's default
    # constructor makes them: the same updates, in fewer optimizer calls
    constructor='GroupedOptimWrapperConstructor',
    paramwise_cfg=dict(
        custom_keys={
            'backbone': dict(lr_mult=0.1),
            'sampling_offsets': dict(lr_mult=0.1),
            'reference_points': dict(lr_mult=0.1),
        }))

max_epochs = 50
train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=max_epochs, val_interval=1)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')

param_scheduler = [
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[40],
         gamma=0.1)
]

# 16 GPUs x 2 images. Do not change: `--auto-scale-lr` scales from it.
auto_scale_lr = dict(base_batch_size=32)
