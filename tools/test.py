"""Test (and evaluate) a detector: ``python tools/test.py CONFIG CHECKPOINT [--out]``.

The command line is MMDetection's. ``--show-dir`` draws the detections on the test
images; ``--out`` dumps the predictions to a pickle for offline analysis
(``tools/analysis_tools/confusion_matrix.py``).
"""
import argparse
import copy
import os
import os.path as osp
import sys
import warnings

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))  # the checkout's packages

from mmengine.config import Config, DictAction  # noqa: E402
from mmengine.registry import RUNNERS  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

from projects.deformable_detr.checkpoint import allow_mmengine_checkpoints  # noqa: E402
from projects.deformable_detr.engine.launch import (close_distributed, run_main,  # noqa: E402
                                                    setup_cpu_distributed)
from projects.deformable_detr.engine.config_file import TEST_KEYS, load_config  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Test (and evaluate) a detector')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--work-dir', help='the dir to save the evaluation metrics')
    parser.add_argument('--out', help='dump the predictions to a pickle file (.pkl)')
    parser.add_argument('--show', action='store_true', help='show the detections')
    parser.add_argument('--show-dir', help='save the drawn detections under '
                        'WORK_DIR/TIMESTAMP/SHOW_DIR')
    parser.add_argument('--wait-time', type=float, default=2, help='seconds per shown image')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, key=value pairs')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    parser.add_argument('--tta', action='store_true', help='test-time augmentation (flip)')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args()
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def enable_visualization(cfg: Config, args: argparse.Namespace) -> None:
    """Turns on the DetVisualizationHook for ``--show`` / ``--show-dir``."""
    hook = cfg.default_hooks.get('visualization')
    if hook is None:
        raise RuntimeError('--show/--show-dir need `default_hooks.visualization = '
                           "dict(type='DetVisualizationHook')` in the config")
    hook.draw = True
    if args.show:
        hook.show, hook.wait_time = True, args.wait_time
    if args.show_dir:
        hook.test_out_dir = args.show_dir


def enable_tta(cfg: Config) -> None:
    """Wraps the model in DetTTAModel; by default, horizontal flip merged by NMS."""
    if 'tta_model' not in cfg:
        warnings.warn('no `tta_model` in the config: using DetTTAModel with NMS 0.5')
        cfg.tta_model = dict(type='DetTTAModel',
                             tta_cfg=dict(nms=dict(type='nms', iou_threshold=0.5),
                                          max_per_img=100))
    if 'tta_pipeline' not in cfg:
        warnings.warn('no `tta_pipeline` in the config: flipping the test pipeline')
        dataset = cfg.test_dataloader.dataset
        while 'dataset' in dataset:  # dataset wrappers
            dataset = dataset.dataset
        pipeline = copy.deepcopy(dataset.pipeline)
        pack = pipeline[-1]
        meta_keys = tuple(pack.get('meta_keys', ('img_id', 'img_path', 'ori_shape',
                                                 'img_shape', 'scale_factor')))
        pack.meta_keys = meta_keys + tuple(k for k in ('flip', 'flip_direction')
                                           if k not in meta_keys)
        pipeline[-1] = dict(type='TestTimeAug', transforms=[
            [dict(type='RandomFlip', prob=1.), dict(type='RandomFlip', prob=0.)], [pack]])
        cfg.tta_pipeline = pipeline
    cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
    cfg.tta_model.module = cfg.model
    cfg.model = cfg.tta_model


def main() -> None:
    args = parse_args()
    allow_mmengine_checkpoints()  # MMEngine checkpoints load under torch>=2.6
    cfg = load_config(args.config, args.cfg_options, needs=TEST_KEYS)
    cfg.launcher = args.launcher
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])
    cfg.load_from = args.checkpoint
    # a checkpoint that does not fit the model is an error, not a warning and a
    # half-loaded model (MMEngine's load_from)
    cfg.custom_hooks = list(cfg.get('custom_hooks') or []) + [
        dict(type='ddetr.CheckpointFitHook')]
    if args.show or args.show_dir:
        enable_visualization(cfg, args)
    if args.tta:
        enable_tta(cfg)
    setup_cpu_distributed(cfg)

    runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)
    if args.out is not None:
        if not args.out.endswith(('.pkl', '.pickle')):
            raise ValueError(f'--out must be a .pkl file, got {args.out}')
        from mmdet.evaluation import DumpDetResults
        runner.test_evaluator.metrics.append(DumpDetResults(out_file_path=args.out))
    runner.test()
    close_distributed()


if __name__ == '__main__':
    run_main(main)  # a failing process of a distributed job ends the job
