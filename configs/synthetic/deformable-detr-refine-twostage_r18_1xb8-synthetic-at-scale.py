# The CPU demo with the switches of the COCO "at-scale" config (docs/training_at_scale.md):
# activation checkpointing, EMA weights, iteration checkpoints, preemption.
_base_ = './deformable-detr-refine-twostage_r18_1xb8-synthetic.py'

model = dict(encoder=dict(num_cp=2), decoder=dict(num_cp=3))

default_hooks = dict(checkpoint=dict(iter_interval=50, max_keep_iter_ckpts=2))

custom_hooks = [
    dict(type='EMAHook', ema_type='ExpMomentumEMA', momentum=0.0002, update_buffers=True,
         priority=49),
    dict(type='ddetr.PreemptionHook', signals=('SIGTERM', 'SIGUSR1')),
]
