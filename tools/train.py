"""Train a detector: ``python tools/train.py CONFIG [--work-dir] [--resume [PATH]] [--amp]``.

The command line is MMDetection's. The repository root goes on ``sys.path`` so that
configs can ``custom_imports`` ``projects.deformable_detr`` (and it ``ops``) from a
plain checkout.
"""
import argparse
import datetime
import logging
import os
import os.path as osp
import sys

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
from mmengine.config import Config, DictAction  # noqa: E402
from mmengine.logging import print_log  # noqa: E402
from mmengine.optim import AmpOptimWrapper, OptimWrapper  # noqa: E402
from mmengine.registry import OPTIM_WRAPPERS, RUNNERS  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

import projects.deformable_detr.safe_checkpoint  # noqa: E402,F401  (torch>=2.6 resume)


@OPTIM_WRAPPERS.register_module(force=True)
class CPUAmpOptimWrapper(AmpOptimWrapper):
    """``AmpOptimWrapper`` that also runs on CPU: bfloat16 autocast, no loss scaling.

    MMEngine's wrapper asserts an accelerator. bfloat16 keeps float32's exponent range,
    so it needs no loss scaler; a disabled ``torch.amp.GradScaler`` makes ``scale``,
    ``unscale_``, ``step`` and ``update`` plain pass-throughs.
    """

    def __init__(self, loss_scale: str = 'dynamic', dtype: str = 'bfloat16', **kwargs):
        OptimWrapper.__init__(self, **kwargs)
        self._scale_update_param = None
        self.loss_scaler = torch.amp.GradScaler('cpu', enabled=False)
        self.cast_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        if self.cast_dtype != torch.bfloat16:
            raise ValueError(f'CPU autocast here supports bfloat16 only, got {dtype}')


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


def setup_cpu_distributed(cfg: Config) -> None:
    """Lets ``--launcher pytorch`` work without CUDA: gloo, DDP without device_ids.

    MMEngine's ``init_dist`` calls ``torch.cuda.set_device``, which a CPU build of torch
    lacks, so the process group is initialised here (the Runner then skips it).
    """
    if cfg.launcher == 'none' or torch.cuda.is_available():
        return
    if cfg.launcher != 'pytorch':
        raise NotImplementedError(f'--launcher {cfg.launcher} needs CUDA; on CPU use '
                                  '--launcher pytorch (tools/dist_train.sh)')
    dist_cfg = dict(cfg.get('env_cfg', {}).get('dist_cfg', {}))
    dist_cfg.pop('init_backend', None)
    if dist_cfg.get('backend', 'nccl') != 'gloo':
        print_log(f"no CUDA: dist backend {dist_cfg.get('backend', 'nccl')} -> gloo",
                  logger='current', level=logging.WARNING)
    dist_cfg['backend'] = 'gloo'
    if isinstance(dist_cfg.get('timeout'), (int, float)):
        dist_cfg['timeout'] = datetime.timedelta(seconds=dist_cfg['timeout'])
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(**dist_cfg)
    if cfg.get('model_wrapper_cfg') is None:
        # The Runner's default passes device_ids=[LOCAL_RANK], which
        # DistributedDataParallel refuses for a CPU module.
        cfg.model_wrapper_cfg = dict(
            type='MMDistributedDataParallel', device_ids=None, broadcast_buffers=False,
            find_unused_parameters=cfg.get('find_unused_parameters', False))


def setup_amp(cfg: Config) -> None:
    """``--amp``: MMEngine's AmpOptimWrapper on GPU, its bfloat16 CPU variant otherwise."""
    wrapper = cfg.optim_wrapper.get('type', 'OptimWrapper')
    if wrapper not in ('OptimWrapper', 'AmpOptimWrapper', 'CPUAmpOptimWrapper'):
        print_log(f'--amp: keeping optim_wrapper type {cfg.optim_wrapper.type}',
                  logger='current', level=logging.WARNING)
        return
    if torch.cuda.is_available():
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.loss_scale = 'dynamic'
    else:
        cfg.optim_wrapper.type = 'CPUAmpOptimWrapper'
        cfg.optim_wrapper.dtype = 'bfloat16'


def main() -> None:
    args = parse_args()
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)

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
    setup_cpu_distributed(cfg)

    runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)
    runner.train()
    close_distributed()


def close_distributed() -> None:
    """Tears the process group down before exit (MMEngine leaves it to the interpreter).

    Otherwise gloo's threads may still run while the process exits: "terminate called
    without an active exception", SIGABRT, and torchrun reports the run as failed.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == '__main__':
    main()
