"""Inference speed (FPS), data loading and dataset speed, with MMDetection's benchmarks.

    python tools/analysis_tools/benchmark.py CONFIG --checkpoint CKPT [--max-iter 200]
    python tools/analysis_tools/benchmark.py CONFIG --task dataloader --dataset-type train

``--task inference`` times ``model.test_step`` on single test images (batch 1, no
workers), after ``--num-warmup`` warm-up images. MMDetection's ``InferenceBenchmark``
is CUDA-only (``model.cuda()``, ``torch.cuda.synchronize``); the subclass here runs on
whatever device MMEngine picks, the CPU included. ``--amp fp16`` (or ``bf16``) runs the
model under ``torch.autocast``. On a GPU, mmdet's own Deformable DETR configs run
mmcv's CUDA kernel, from mmcv's CUDA build or compiled standalone from ``$MMCV_SDIST``
(``tools/gpu/mmcv_cuda.py``).
"""
import argparse
import logging
import os
import os.path as osp
import sys
import time
from typing import Optional

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
from mmengine import MMLogger  # noqa: E402
from mmengine.config import DictAction  # noqa: E402
from mmengine.device import get_device  # noqa: E402
from mmengine.dist import init_dist  # noqa: E402
from mmengine.logging import print_log  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from mmengine.runner import load_checkpoint  # noqa: E402

from projects.deformable_detr.checkpoint import allow_mmengine_checkpoints  # noqa: E402
from projects.deformable_detr.engine.config_file import load_config  # noqa: E402


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def make_inference_benchmark(amp: Optional[torch.dtype] = None):
    """Builds the device-agnostic subclass (mmdet imports wait for the config's scope).

    Args:
        amp: Run ``test_step`` under ``torch.autocast`` in this dtype (None: off).
    """
    from mmcv.cnn import fuse_conv_bn
    from mmdet.registry import MODELS
    from mmdet.utils.benchmark import InferenceBenchmark, print_log

    class AnyDeviceInferenceBenchmark(InferenceBenchmark):
        """``InferenceBenchmark`` on the CPU or GPU; random weights without checkpoint."""

        def _init_model(self, checkpoint, is_fuse_conv_bn):
            model = MODELS.build(self.cfg.model)
            if checkpoint:
                load_checkpoint(model, checkpoint, map_location='cpu')
            if is_fuse_conv_bn:
                model = fuse_conv_bn(model)
            return model.to(get_device()).eval()

        def run_once(self) -> dict:
            elapsed, timed = 0., 0
            for i, data in enumerate(self.data_loader):
                _sync()
                start = time.perf_counter()
                with torch.no_grad(), torch.autocast(get_device(), amp or torch.float32,
                                                     enabled=amp is not None):
                    self.model.test_step(data)
                _sync()
                if i >= self.num_warmup:
                    elapsed += time.perf_counter() - start
                    timed += 1
                    if (i + 1) % self.log_interval == 0:
                        print_log(f'Done image [{i + 1:<3}/{self.max_iter}], '
                                  f'fps: {timed / elapsed:.2f} img/s, '
                                  f'times per image: {1000 * elapsed / timed:.1f} ms/img',
                                  self.logger)
                if i + 1 == self.max_iter:
                    break
            if timed == 0:
                raise RuntimeError(f'only {len(self.data_loader)} test images: fewer than '
                                   f'--num-warmup {self.num_warmup} + 1')
            return {'fps': timed / elapsed}

        def average_multiple_runs(self, results):
            if torch.cuda.is_available():
                return super().average_multiple_runs(results)
            fps = [round(r['fps'], 2) for r in results]
            avg = sum(fps) / len(fps)
            print_log(f'Overall fps: {fps}[{avg:.2f}] img/s, times per image: '
                      f'{1000 / avg:.1f} ms/img (device: cpu, '
                      f'{torch.get_num_threads()} threads)', self.logger)
            return {'avg_fps': avg, 'fps_list': fps}

    return AnyDeviceInferenceBenchmark


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Benchmark a detector')
    parser.add_argument('config', help='config file path')
    parser.add_argument('--checkpoint', help='checkpoint (inference; random weights if none)')
    parser.add_argument('--task', choices=['inference', 'dataloader', 'dataset'],
                        default='inference', help='what to time')
    parser.add_argument('--dataset-type', choices=['train', 'val', 'test'], default='test',
                        help='which data (dataloader/dataset tasks)')
    parser.add_argument('--repeat-num', type=int, default=1, help='repeat and average')
    parser.add_argument('--max-iter', type=int, default=2000, help='images per run')
    parser.add_argument('--log-interval', type=int, default=50, help='log every N images')
    parser.add_argument('--num-warmup', type=int, default=5, help='untimed first images')
    parser.add_argument('--amp', choices=['fp16', 'bf16'],
                        help='inference under torch.autocast in this dtype')
    parser.add_argument('--fuse-conv-bn', action='store_true',
                        help='fuse conv and bn (slightly faster inference)')
    parser.add_argument('--work-dir', help='also write the log here')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, key=value pairs')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher (dataloader/dataset only)')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args()
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def main() -> None:
    args = parse_args()
    allow_mmengine_checkpoints()  # --checkpoint: an MMEngine checkpoint, torch>=2.6
    cfg = load_config(args.config, args.cfg_options)  # imports its custom_imports
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    distributed = args.launcher != 'none'
    if distributed:
        init_dist(args.launcher, **cfg.get('env_cfg', {}).get('dist_cfg', {}))
    log_file = None
    if args.work_dir:
        os.makedirs(args.work_dir, exist_ok=True)
        log_file = osp.join(args.work_dir, f'benchmark_{time.strftime("%Y%m%d_%H%M%S")}.log')
    logger = MMLogger.get_instance('benchmark', log_file=log_file, log_level='INFO')

    from mmdet.utils.benchmark import DataLoaderBenchmark, DatasetBenchmark
    common = dict(max_iter=args.max_iter, log_interval=args.log_interval,
                  num_warmup=args.num_warmup, logger=logger)
    if args.task == 'inference':
        if torch.cuda.is_available() and not cfg.model.type.startswith('ddetr.'):
            # mmdet's own model (mmcv's attention layers) may need mmcv's kernel
            sys.path.insert(0, osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))),
                                        'gpu'))
            from mmcv_cuda import give_mmcv_its_cuda_kernel
            try:
                print_log(f'mmcv attention layers: {give_mmcv_its_cuda_kernel()}', logger)
            except RuntimeError as err:
                print_log(str(err), logger, level=logging.WARNING)
        amp = {None: None, 'fp16': torch.float16, 'bf16': torch.bfloat16}[args.amp]
        benchmark = make_inference_benchmark(amp)(cfg, args.checkpoint, distributed,
                                                  args.fuse_conv_bn, **common)
    elif args.task == 'dataloader':
        benchmark = DataLoaderBenchmark(cfg, distributed, args.dataset_type, **common)
    else:
        benchmark = DatasetBenchmark(cfg, args.dataset_type, **common)
    benchmark.run(args.repeat_num)


if __name__ == '__main__':
    main()
