"""Fixtures of the tools' tests: a tiny data set, tiny configs, a recording hook, runs.

Everything here is made once per session in a temporary directory:

- a tiny COCO data set drawn here (8 images of 64 px, 2 classes);
- a tiny config of mmdet's Deformable DETR (``config``) and the same with this
  project's model (``ours``);
- a hook module, ``tiny_hooks``, that records per-rank losses and image ids (and can
  SIGKILL its own process);
- the baseline training run (8 iterations, batch 2) and a test run of its last
  checkpoint, which several tests compare against or build on.
"""
import functools
import json
import os
import os.path as osp
import subprocess
import sys
from typing import Callable, Dict, Optional

import numpy as np
import pytest

pytest.importorskip('mmdet')

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))

# mmdet's own Deformable DETR (scope mmdet), 2 classes, 64 px images, d=32, one encoder
# and one decoder layer, no dropout, frozen BN: deterministic on the CPU, and 2 processes
# x batch 1 compute what 1 process x batch 2 does.
TINY_CONFIG = '''
data_root = {data_root!r}
custom_imports = dict(imports=['tiny_hooks'], allow_failed_imports=False)
custom_hooks = [dict(type='RecordHook')]
metainfo = dict(classes=('red', 'green'), palette=[(220, 20, 60), (0, 200, 80)])
d = 32
attn = dict(embed_dims=d, num_heads=4, num_levels=2, num_points=2, dropout=0.0,
            batch_first=True)
ffn = dict(embed_dims=d, feedforward_channels=64, ffn_drop=0.0)
model = dict(
    type='DeformableDETR', num_queries=10, num_feature_levels=2,
    with_box_refine=False, as_two_stage=False,
    data_preprocessor=dict(type='DetDataPreprocessor', mean=[123.675, 116.28, 103.53],
                           std=[58.395, 57.12, 57.375], bgr_to_rgb=True, pad_size_divisor=1),
    backbone=dict(type='ResNet', depth=18, base_channels=8, num_stages=4, out_indices=(2, 3),
                  frozen_stages=-1, norm_cfg=dict(type='BN', requires_grad=False),
                  norm_eval=True, style='pytorch', init_cfg=None),
    neck=dict(type='ChannelMapper', in_channels=[32, 64], kernel_size=1, out_channels=d,
              act_cfg=None, norm_cfg=dict(type='GN', num_groups=8), num_outs=2),
    encoder=dict(num_layers=1, layer_cfg=dict(self_attn_cfg=attn, ffn_cfg=ffn)),
    decoder=dict(num_layers=1, return_intermediate=True, post_norm_cfg=None,
                 layer_cfg=dict(self_attn_cfg=dict(embed_dims=d, num_heads=4, dropout=0.0,
                                                   batch_first=True),
                                cross_attn_cfg=attn, ffn_cfg=ffn)),
    positional_encoding=dict(num_feats=d // 2, normalize=True, offset=-0.5),
    bbox_head=dict(type='DeformableDETRHead', num_classes=2, embed_dims=d,
                   sync_cls_avg_factor=True,
                   loss_cls=dict(type='FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25,
                                 loss_weight=2.0),
                   loss_bbox=dict(type='L1Loss', loss_weight=5.0),
                   loss_iou=dict(type='GIoULoss', loss_weight=2.0)),
    train_cfg=dict(assigner=dict(type='HungarianAssigner', match_costs=[
        dict(type='FocalLossCost', weight=2.0),
        dict(type='BBoxL1Cost', weight=5.0, box_format='xywh'),
        dict(type='IoUCost', iou_mode='giou', weight=2.0)])),
    test_cfg=dict(max_per_img=10))

pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=(64, 64), keep_ratio=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
dataset = dict(type='CocoDataset', data_root=data_root, metainfo=metainfo,
               ann_file='ann.json', data_prefix=dict(img='images/'),
               filter_cfg=dict(filter_empty_gt=False), pipeline=pipeline)
train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
                        sampler=dict(type='DefaultSampler', shuffle=True), dataset=dataset)
val_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False, drop_last=False,
                      sampler=dict(type='DefaultSampler', shuffle=False),
                      dataset=dict(dataset, test_mode=True))
test_dataloader = val_dataloader
val_evaluator = dict(type='CocoMetric', ann_file=data_root + '/ann.json', metric='bbox')
test_evaluator = val_evaluator

optim_wrapper = dict(type='OptimWrapper',
                     optimizer=dict(type='AdamW', lr=1e-3, weight_decay=1e-4),
                     clip_grad=dict(max_norm=1.0, norm_type=2))
train_cfg = dict(type='IterBasedTrainLoop', max_iters=8, val_interval=8)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
param_scheduler = [dict(type='MultiStepLR', by_epoch=False, begin=0, end=8, milestones=[6])]
auto_scale_lr = dict(base_batch_size=2, enable=False)

default_scope = 'mmdet'
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=1),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', interval=2, by_epoch=False, max_keep_ckpts=10,
                    save_best='coco/bbox_mAP', rule='greater'),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='DetVisualizationHook'))
env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method='fork',
                                                  opencv_num_threads=0),
               dist_cfg=dict(backend='gloo'))
vis_backends = [dict(type='LocalVisBackend')]
visualizer = dict(type='DetLocalVisualizer', vis_backends=vis_backends, name='visualizer')
log_processor = dict(type='LogProcessor', window_size=1, by_epoch=False)
log_level = 'INFO'
load_from = None
resume = False
randomness = dict(seed=0)
'''

# The same, with this project's model (scope ddetr, our op) in place of mmdet's.
TINY_OURS_CONFIG = '''
_base_ = './tiny_ddetr.py'
custom_imports = dict(imports=['tiny_hooks', 'projects.deformable_detr'],
                      allow_failed_imports=False)
layers = dict(num_layers=1, embed_dims=32, num_heads=4, num_points=2,
              feedforward_channels=64, dropout=0.0)
model = dict(
    _delete_=True, type='ddetr.DeformableDETR', num_queries=10, num_feature_levels=2,
    data_preprocessor={{_base_.model.data_preprocessor}},
    backbone={{_base_.model.backbone}}, neck={{_base_.model.neck}},
    encoder=layers, decoder=layers,
    bbox_head=dict(type='ddetr.DeformableDETRHead', num_classes=2, embed_dims=32),
    train_cfg=dict(assigner=dict(type='ddetr.HungarianAssigner', cls_weight=2.0,
                                 l1_weight=5.0, giou_weight=2.0)),
    test_cfg=dict(max_per_img=10))
'''

# RecordHook: one json line per training iteration and rank (losses, gradient norm,
# image ids, the dtype of the first Linear's output) in WORK_DIR/record_rank{R}.jsonl;
# with KILL_AT_ITER=N in the environment it SIGKILLs its own process after iteration N;
# with RAISE_AT_ITER=N (and RAISE_RANK=R, default 0) rank R raises before iteration N,
# and with RAISE_STUCK=1 also starts a non-daemon thread that keeps its interpreter up;
# with STALL_SAVE_AT=N the checkpoint of iteration N stalls half written: the process
# writes half its bytes, creates WORK_DIR/stalled and sleeps (for the test to kill it).
HOOKS_MODULE = '''
import builtins, json, os, os.path as osp, signal, threading, time
import torch
from mmengine.dist import get_rank
from mmengine.hooks import Hook
from mmdet.registry import HOOKS


class _HalfWriter:
    def __init__(self, f, marker):
        self.f, self.marker = f, marker

    def write(self, data):
        self.f.write(data[:len(data) // 2])
        self.f.flush()
        os.fsync(self.f.fileno())
        open(self.marker, 'w').close()
        time.sleep(600)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def __getattr__(self, name):
        return getattr(self.f, name)


@HOOKS.register_module()
class RecordHook(Hook):
    def before_train_iter(self, runner, batch_idx, data_batch=None):
        if (int(os.environ.get('RAISE_AT_ITER', -1)) == runner.iter + 1
                and int(os.environ.get('RAISE_RANK', 0)) == get_rank()):
            if os.environ.get('RAISE_STUCK'):  # a thread that would hold the exit up
                threading.Thread(target=time.sleep, args=(3600,), daemon=False).start()
            raise RuntimeError(f'injected failure on rank {get_rank()} at iteration '
                               f'{runner.iter + 1}')

    def before_save_checkpoint(self, runner, checkpoint):
        if int(os.environ.get('STALL_SAVE_AT', -1)) != checkpoint['meta']['iter'] or \\
                'optimizer' not in checkpoint:  # not a best checkpoint
            return
        marker, real_open = osp.join(runner.work_dir, 'stalled'), builtins.open

        def stalling_open(file, mode='r', *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            return _HalfWriter(f, marker) if 'w' in mode and 'b' in mode else f
        builtins.open = stalling_open

    def before_train(self, runner):
        self.dtype = None
        model = getattr(runner.model, 'module', runner.model)
        linear = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))

        def keep(module, args, out):
            self.dtype = str(out.dtype)
        linear.register_forward_hook(keep)

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        rank = get_rank()
        line = dict(rank=rank, iter=runner.iter + 1, dtype=self.dtype,
                    img_ids=[s.img_id for s in data_batch['data_samples']],
                    **{k: float(v) for k, v in outputs.items()})
        scalars = runner.message_hub.log_scalars
        if 'train/grad_norm' in scalars:
            line['grad_norm'] = float(scalars['train/grad_norm'].current())
        with open(osp.join(runner.work_dir, f'record_rank{rank}.jsonl'), 'a') as f:
            f.write(json.dumps(line) + '\\n')
        if int(os.environ.get('KILL_AT_ITER', -1)) == runner.iter + 1:
            os.kill(os.getpid(), signal.SIGKILL)
'''


def _make_tiny_coco(root: str, num_images: int = 8, size: int = 64, seed: int = 0) -> None:
    """``num_images`` PNGs with 1-2 coloured rectangles (2 classes) and a COCO json."""
    import cv2
    rng = np.random.default_rng(seed)
    os.makedirs(osp.join(root, 'images'), exist_ok=True)
    images, anns = [], []
    for i in range(num_images):
        img = np.full((size, size, 3), 40, np.uint8)
        for _ in range(int(rng.integers(1, 3))):
            w, h = (int(v) for v in rng.integers(12, 30, 2))
            x, y = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
            label = int(rng.integers(0, 2))
            img[y:y + h, x:x + w] = (60, 60, 220) if label == 0 else (60, 200, 60)
            anns.append(dict(id=len(anns) + 1, image_id=i + 1, category_id=label + 1,
                             bbox=[x, y, w, h], area=w * h, iscrowd=0))
        cv2.imwrite(osp.join(root, 'images', f'{i:03d}.png'), img)
        images.append(dict(id=i + 1, file_name=f'{i:03d}.png', width=size, height=size))
    with open(osp.join(root, 'ann.json'), 'w') as f:
        json.dump(dict(images=images, annotations=anns,
                       categories=[dict(id=1, name='red'), dict(id=2, name='green')]), f)


def _read_records(work_dir: str, rank: int = 0) -> Dict[int, dict]:
    """RecordHook's lines by iteration (a resumed run's later line wins)."""
    with open(osp.join(work_dir, f'record_rank{rank}.jsonl')) as f:
        return {r['iter']: r for r in map(json.loads, f)}


def _last_metrics(work_dir: str) -> dict:
    """The last validation line of the run's json log (scalars.json)."""
    runs = sorted(d for d in os.listdir(work_dir) if osp.isdir(osp.join(work_dir, d))
                  and osp.isfile(osp.join(work_dir, d, 'vis_data', 'scalars.json')))
    with open(osp.join(work_dir, runs[-1], 'vis_data', 'scalars.json')) as f:
        lines = [json.loads(line) for line in f]
    return [line for line in lines if 'coco/bbox_mAP' in line][-1]


@pytest.fixture(scope='session')
def tiny_setup(tmp_path_factory) -> Dict[str, str]:
    """Data, configs and hook module in a temporary directory.

    Keys: ``tmp`` (the directory, importable as the hook module's home), ``config``
    (mmdet's model), ``ours`` (this project's model), ``data`` (the data root).
    """
    tmp = str(tmp_path_factory.mktemp('ddetr_tools'))
    _make_tiny_coco(osp.join(tmp, 'data'))
    config = osp.join(tmp, 'tiny_ddetr.py')
    with open(config, 'w') as f:
        f.write(TINY_CONFIG.format(data_root=osp.join(tmp, 'data')))
    with open(osp.join(tmp, 'tiny_ours.py'), 'w') as f:
        f.write(TINY_OURS_CONFIG)
    with open(osp.join(tmp, 'tiny_hooks.py'), 'w') as f:
        f.write(HOOKS_MODULE)
    return dict(tmp=tmp, config=config, ours=osp.join(tmp, 'tiny_ours.py'),
                data=osp.join(tmp, 'data'))


@pytest.fixture(scope='session')
def run_tool(run_tool, tiny_setup) -> Callable:
    """The root ``run_tool``, with the tiny configs' hook module importable."""
    return functools.partial(run_tool, pythonpath=[tiny_setup['tmp']])


@pytest.fixture(scope='session')
def start_tool(tiny_setup, tool_env) -> Callable[..., subprocess.Popen]:
    """Starts a tool's command line as ``run_tool`` runs it, without waiting for it.

    The process leads its own process group (``os.killpg`` reaches its children too);
    its output goes to ``WORK/tool_output.txt`` files named by the caller's ``log``.
    """

    def start(args, log: str, env: Optional[Dict[str, str]] = None) -> subprocess.Popen:
        full_env = tool_env([tiny_setup['tmp']], env)
        cmd = ['nice', '-n', '5'] + ([sys.executable] if args[0].endswith('.py') else []) \
            + list(args)
        with open(log, 'w') as out:
            return subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
    return start


@pytest.fixture(scope='session')
def synthetic_set(tmp_path_factory, run_tool) -> str:
    """A tiny synthetic shapes set (8 train and 2 val images of 128 px), made by
    tools/dataset_converters/synthetic_coco.py; the demo config's ``data_root``."""
    out = str(tmp_path_factory.mktemp('synthetic_set'))
    run_tool(['tools/dataset_converters/synthetic_coco.py', '--out', out,
              '--num-train', '8', '--num-val', '2', '--seed', '0'])
    return out + '/'


@pytest.fixture(scope='session')
def read_records() -> Callable[..., Dict[int, dict]]:
    """RecordHook's lines of a work dir by iteration: see :func:`_read_records`."""
    return _read_records


@pytest.fixture(scope='session')
def last_metrics() -> Callable[[str], dict]:
    """The last validation metrics of a work dir: see :func:`_last_metrics`."""
    return _last_metrics


@pytest.fixture(scope='session')
def baseline_run(tiny_setup, run_tool) -> str:
    """The uninterrupted tiny training (8 iterations, batch 2): its work dir."""
    work_dir = osp.join(tiny_setup['tmp'], 'baseline')
    run_tool(['tools/train.py', tiny_setup['config'], '--work-dir', work_dir])
    return work_dir


@pytest.fixture(scope='session')
def prediction_run(tiny_setup, run_tool, baseline_run) -> str:
    """tools/test.py on the baseline run's last checkpoint, with --out and --show-dir.

    Its output is in ``stdout.txt`` of the returned directory.
    """
    out_dir = osp.join(tiny_setup['tmp'], 'test_out')
    proc = run_tool(['tools/test.py', tiny_setup['config'], osp.join(baseline_run, 'iter_8.pth'),
                     '--work-dir', out_dir, '--out', osp.join(out_dir, 'results.pkl'),
                     '--show-dir', 'vis'])
    with open(osp.join(out_dir, 'stdout.txt'), 'w') as f:
        f.write(proc.stdout + proc.stderr)
    return out_dir
