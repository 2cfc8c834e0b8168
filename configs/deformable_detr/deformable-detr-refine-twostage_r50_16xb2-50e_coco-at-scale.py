# ++ two-stage (46.9 AP in the paper), with the switches for long runs on shared clusters
# (docs/training_at_scale.md): activation checkpointing, EMA weights, a resumable
# checkpoint every 1000 iterations, and a checkpoint on a preemption signal.
_base_ = './deformable-detr-refine-twostage_r50_16xb2-50e_coco.py'

# Memory: every encoder and decoder layer recomputes its activations in backward, and
# so do the ResNet's blocks (mmdet's with_cp).
model = dict(
    backbone=dict(with_cp=True),
    encoder=dict(num_cp=6),
    decoder=dict(num_cp=6))

default_hooks = dict(
    # Besides the epoch checkpoints: iter_N.pth every 1000 iterations (7330 an epoch at
    # 16x2 on COCO), the last 2 kept.
    checkpoint=dict(iter_interval=1000, max_keep_iter_ckpts=2))

custom_hooks = [
    # Validation, test and the checkpoints' state_dict use the EMA weights; the
    # checkpoints also carry the training weights (ema_state_dict) to resume with.
    dict(type='EMAHook', ema_type='ExpMomentumEMA', momentum=0.0002, update_buffers=True,
         priority=49),
    # On SIGTERM (Slurm's preemption or time limit) or SIGUSR1 (sbatch --signal=USR1@120):
    # save after the running iteration, then exit with status 75.
    dict(type='ddetr.PreemptionHook', signals=('SIGTERM', 'SIGUSR1')),
]
