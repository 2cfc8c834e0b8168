"""Train a detector: ``python tools/train.py CONFIG [--work-dir] [--resume [PATH]] [--amp]``.

The command line is MMDetection's. The repository root goes on ``sys.path`` so that
configs can ``custom_imports`` ``projects.deformable_detr`` (and it ``ops``) from a
plain checkout.
"""
import argparse
import os
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))  # the checkout's packages

from mmengine.config import DictAction  # noqa: E402
from mmengine.registry import RUNNERS  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

from projects.deformable_detr.checkpoint import allow_mmengine_checkpoints  # noqa: E402
from projects.deformable_detr.engine.hooks.exact_resume_hook import \
    use_exact_resume  # noqa: E402
from projects.deformable_detr.engine.launch import (close_distributed, run_main,  # noqa: E402
                                                    setup_cpu_distributed)
from projects.deformable_detr.engine.optimizers import setup_amp  # noqa: E402
from projects.deformable_detr.engine.config_file import TRAIN_KEYS, load_config  # noqa: E402
from projects.deformable_detr.engine.auto_resume import (  # noqa: E402
    join_restarted_group, resume_if_restarted)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Train a detector')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument('--amp', action='store_true', default=False,
                        help='automatic mixed precision: float16 on GPU, bfloat16 on CPU')
    parser.add_argument('--auto-scale-lr', action='store_true',
                        help='scale the learning rate by total batch / base_batch_size')
    parser.add_argument('--resume', nargs='?', type=str, const='auto',
                        help='resume from this checkpoint; without a path, resume from the '
                        'latest checkpoint in the work dir')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, key=value pairs, e.g. '
                        'train_cfg.max_iters=100 "optim_wrapper.optimizer.lr=1e-4"')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    # torch.distributed.launch passes --local-rank (torch>=2.0), older ones --local_rank
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args()
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def main() -> None:
    args = parse_args()
    cfg = load_config(args.config, args.cfg_options, needs=TRAIN_KEYS)
    cfg.launcher = args.launcher

    # work_dir: command line > config > ./work_dirs/CONFIG_NAME
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])

    if args.amp:
        setup_amp(cfg)
    if args.auto_scale_lr:
        if 'base_batch_size' not in cfg.get('auto_scale_lr', {}):
            raise RuntimeError('--auto-scale-lr needs `auto_scale_lr = dict(enable=False, '
                               'base_batch_size=N)` in the config')
        cfg.auto_scale_lr.enable = True
    if args.resume == 'auto':  # the latest checkpoint of work_dir, if any
        cfg.resume, cfg.load_from = True, None
    elif args.resume is not None:
        cfg.resume, cfg.load_from = True, args.resume
    resume_if_restarted(cfg)  # restarted by torchrun or requeued by Slurm: --resume
    use_exact_resume(cfg)  # MMEngine's CheckpointHook -> ddetr.ExactResumeHook
    if cfg.launcher == 'pytorch':  # a restart by torchrun: a store of its own attempt
        join_restarted_group(cfg.get('env_cfg', {}).get('dist_cfg', {}))
    setup_cpu_distributed(cfg)
    allow_mmengine_checkpoints()  # MMEngine checkpoints load under torch>=2.6 (--resume)

    runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)
    runner.train()
    close_distributed()


if __name__ == '__main__':
    run_main(main)  # a failing process of a distributed job ends the job
