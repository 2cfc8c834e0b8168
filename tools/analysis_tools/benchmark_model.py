"""Time our Deformable DETR against mmdet 3.3's, same weights, same inputs.

One training step (forward + backward) and one inference of each model, runs
interleaved (mmdet, ours, mmdet, ours...) so that a machine's changing load hits
both alike; prints the median times side by side with the speed-up, and checks
that the two models agree on the losses.

    python tools/analysis_tools/benchmark_model.py            # 2 images 512x512, R50
    python tools/analysis_tools/benchmark_model.py --size 800 --repeat 5 --threads 2
"""
import argparse
import copy
import logging
import os
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import mmdet  # noqa: E402
from mmdet.registry import MODELS  # noqa: E402
from mmdet.structures import DetDataSample  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.logging import MMLogger  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from mmengine.structures import InstanceData  # noqa: E402

from projects.deformable_detr.converters import mmdet_to_ours  # noqa: E402

OURS = os.path.join(ROOT, 'configs', 'deformable_detr', 'deformable-detr_r50_16xb2-50e_coco.py')
THEIRS = os.path.join(os.path.dirname(mmdet.__file__), '.mim', 'configs', 'deformable_detr',
                      'deformable-detr_r50_16xb2-50e_coco.py')


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Benchmark ours vs mmdet DeformableDETR')
    parser.add_argument('--config', default=OURS, help='our config')
    parser.add_argument('--mmdet-config', default=THEIRS, help="mmdet's config")
    parser.add_argument('--size', type=int, default=512, help='square image size')
    parser.add_argument('--batch', type=int, default=2, help='images per step')
    parser.add_argument('--repeat', type=int, default=3, help='timed runs of each')
    parser.add_argument('--warmup', type=int, default=1, help='untimed runs of each')
    parser.add_argument('--threads', type=int, default=None, help='torch intra-op threads')
    return parser.parse_args()


def build_models(args: argparse.Namespace):
    """mmdet's model (random init) and ours with its weights."""
    init_default_scope('mmdet')
    torch.manual_seed(0)
    models = []
    for path in (args.mmdet_config, args.config):
        cfg = Config.fromfile(path)
        cfg.model.backbone.init_cfg = None  # no download; random weights time the same
        models.append(MODELS.build(cfg.model))
    theirs, ours = models
    theirs.init_weights()
    ours.load_state_dict(mmdet_to_ours(theirs.state_dict()), strict=True)
    return theirs, ours


def make_batch(batch: int, size: int, num_gts: int = 5):
    gen = torch.Generator().manual_seed(0)
    inputs = torch.randn(batch, 3, size, size, generator=gen)
    samples = []
    for _ in range(batch):
        xy = torch.rand(num_gts, 2, generator=gen) * size * 0.6
        wh = (torch.rand(num_gts, 2, generator=gen) * 0.3 + 0.05) * size
        sample = DetDataSample(metainfo=dict(
            img_shape=(size, size), ori_shape=(size, size), scale_factor=(1.0, 1.0),
            batch_input_shape=(size, size), pad_shape=(size, size)))
        sample.gt_instances = InstanceData(bboxes=torch.cat([xy, xy + wh], 1),
                                           labels=torch.randint(0, 80, (num_gts, ),
                                                                generator=gen))
        samples.append(sample)
    return inputs, samples


def train_step(model, inputs, samples) -> Dict[str, torch.Tensor]:
    model.train()
    model.zero_grad(set_to_none=True)
    losses = model(inputs, copy.deepcopy(samples), mode='loss')
    sum(losses.values()).backward()
    return losses


def inference(model, inputs, samples):
    model.eval()
    with torch.no_grad():
        return model(inputs, copy.deepcopy(samples), mode='predict')


def timed(fn: Callable) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(label: str, fns: Dict[str, Callable], warmup: int,
                repeat: int) -> Dict[str, List[float]]:
    times = {name: [] for name in fns}
    total = (warmup + repeat) * len(fns)
    done = 0
    for i in range(warmup + repeat):
        for name, fn in fns.items():
            t = timed(fn)
            done += 1
            if i >= warmup:
                times[name].append(t)
            kind = 'warm-up' if i < warmup else 'timed'
            print(f'  [{done}/{total}] {label} {name}: {t:.2f}s ({kind})', flush=True)
    return times


def main() -> None:
    args = parse_args()
    MMLogger.get_current_instance().setLevel(logging.WARNING)  # init_weights' dump
    if args.threads:
        torch.set_num_threads(args.threads)
    theirs, ours = build_models(args)
    inputs, samples = make_batch(args.batch, args.size)

    # The two must compute the same thing for the comparison to mean anything.
    for model in (theirs, ours):
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
            elif isinstance(m, torch.nn.MultiheadAttention):
                m.dropout = 0.0
    print(f'{args.batch} images {args.size}x{args.size}, '
          f'{torch.get_num_threads()} threads; checking agreement...', flush=True)
    loss_theirs = train_step(theirs, inputs, samples)
    loss_ours = train_step(ours, inputs, samples)
    loss_diff = max((loss_ours[k] - loss_theirs[k].reshape(())).abs().item()
                    for k in loss_theirs)

    results = {}
    for label, fn in (('training step', train_step), ('inference', inference)):
        times = interleaved(label, {'mmdet': lambda fn=fn: fn(theirs, inputs, samples),
                                    'ours': lambda fn=fn: fn(ours, inputs, samples)},
                            args.warmup, args.repeat)
        results[label] = {k: statistics.median(v) for k, v in times.items()}

    print(f'\nDeformable DETR (multi-scale, R50), {args.batch} x {args.size}x{args.size}, '
          f'CPU, {torch.get_num_threads()} threads, median of {args.repeat}')
    print(f'| {"":<32} | {"mmdet 3.3":>10} | {"ours":>10} | {"speed-up":>8} |')
    print(f'|{"-" * 34}|{"-" * 12}|{"-" * 12}|{"-" * 10}|')
    for label, t in results.items():
        name = 'training step (fwd + bwd)' if label == 'training step' else label
        print(f'| {name:<32} | {t["mmdet"]:>9.2f}s | {t["ours"]:>9.2f}s | '
              f'{t["mmdet"] / t["ours"]:>7.2f}x |')
    print(f'max |loss difference| over {len(loss_theirs)} losses: {loss_diff:.2e}')


if __name__ == '__main__':
    main()
