# Runtime shared by the Deformable DETR configs: mmdet's default scope, with our
# modules (`ddetr.*`) registered by importing the project package.
default_scope = 'mmdet'
custom_imports = dict(imports=['projects.deformable_detr'], allow_failed_imports=False)

default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50),
    param_scheduler=dict(type='ParamSchedulerHook'),
    # MMEngine's CheckpointHook, plus the RNG states of every process in each checkpoint
    # (exact resume) and atomic files (crash-safe): see
    # projects/deformable_detr/engine/hooks/exact_resume_hook.py
    checkpoint=dict(type='ddetr.ExactResumeHook', interval=1),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='DetVisualizationHook'))

env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='nccl'))

vis_backends = [dict(type='LocalVisBackend')]
visualizer = dict(type='DetLocalVisualizer', vis_backends=vis_backends, name='visualizer')
log_processor = dict(type='LogProcessor', window_size=50, by_epoch=True)

log_level = 'INFO'
load_from = None
resume = False
