"""Where a training run's time goes: one iteration split into its phases, and a validation.

    python tools/analysis_tools/profile_training.py CONFIG [--iters 40] [--warmup 3] \
        [--threads N] [--cfg-options ...]

Runs ``--warmup`` + ``--iters`` training iterations of the config's model, data loader and
optimizer (no runner loop, no hooks) and prints the median time of each phase: fetching
the batch, the data preprocessor, forward with the loss, backward, and the optimizer step
(gradient clipping included); then the forward time of the detector's parts (backbone,
neck, encoder, decoder, head, criterion), taken with forward hooks; then one pass over
the validation set and its evaluation. The model is freshly initialised: the times are
those of any iteration, not of a converged model's (the matching and the top-k do not
depend on the weights' values much).
"""
import argparse
import os.path as osp
import statistics
import sys
import time
from collections import defaultdict
from typing import Dict, List

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

import torch  # noqa: E402
from mmengine.config import DictAction  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

from projects.deformable_detr.engine.config_file import TRAIN_KEYS, load_config  # noqa: E402

PARTS = ('backbone', 'neck', 'positional_encoding', 'encoder', 'decoder', 'bbox_head')


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('config')
    parser.add_argument('--iters', type=int, default=40, help='timed iterations')
    parser.add_argument('--warmup', type=int, default=3, help='untimed iterations first')
    parser.add_argument('--threads', type=int, help='torch intra-op threads')
    parser.add_argument('--work-dir', default='work_dirs/profile_training')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    args = parser.parse_args()
    if args.iters < 1 or args.warmup < 0:
        parser.error(f'--iters must be >= 1 and --warmup >= 0, got {args.iters}, {args.warmup}')
    return args


def time_parts(model: torch.nn.Module) -> Dict[str, float]:
    """Seconds spent in the forward of each part of the detector, summed from now on."""
    spent: Dict[str, float] = defaultdict(float)

    def watch(name: str, module: torch.nn.Module) -> None:
        started: List[float] = []
        module.register_forward_pre_hook(lambda *_: started.append(time.perf_counter()))

        def done(*_):
            spent[name] += time.perf_counter() - started.pop()
        module.register_forward_hook(done)

    for name in PARTS:
        if getattr(model, name, None) is not None:
            watch(name, getattr(model, name))
    criterion = getattr(getattr(model, 'bbox_head', None), 'criterion', None)
    if criterion is not None:
        watch('criterion (matching + loss)', criterion)
    return spent


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.cfg_options, TRAIN_KEYS)
    cfg.work_dir = args.work_dir
    cfg.default_hooks.logger.interval = 10**6  # its lines would only interleave with ours
    runner = Runner.from_cfg(cfg)
    model = runner.model
    optim = runner.build_optim_wrapper(cfg.optim_wrapper)
    loader = runner.build_dataloader(cfg.train_dataloader)
    phases: Dict[str, List[float]] = defaultdict(list)
    batches = iter(loader)
    model.train()
    spent = {}
    for i in range(args.warmup + args.iters):
        if i == args.warmup:
            spent = time_parts(model)
        t = [time.perf_counter()]
        try:
            batch = next(batches)
        except StopIteration:  # a small data set: the next epoch
            batches = iter(loader)
            batch = next(batches)
        t.append(time.perf_counter())
        data = model.data_preprocessor(batch, True)
        t.append(time.perf_counter())
        loss, _ = model.parse_losses(model(**data, mode='loss'))
        t.append(time.perf_counter())
        loss.backward()
        t.append(time.perf_counter())
        optim.step()
        optim.zero_grad()
        t.append(time.perf_counter())
        if i >= args.warmup:
            for name, start, end in zip(('data', 'preprocess', 'forward + loss', 'backward',
                                         'optimizer step'), t, t[1:]):
                phases[name].append(end - start)

    medians = {name: statistics.median(times) for name, times in phases.items()}
    total = sum(medians.values())
    print(f'{args.config}: {args.iters} iterations after {args.warmup}, batch '
          f'{cfg.train_dataloader.batch_size}, {torch.get_num_threads()} threads, '
          f'torch {torch.__version__}')
    print('| phase | median ms | share |\n|---|---|---|')
    for name, value in medians.items():
        print(f'| {name} | {value * 1e3:.1f} | {100 * value / total:.1f}% |')
    print(f'| iteration (sum of medians) | {total * 1e3:.1f} | 100% |')
    print(f'{len(loader)} iterations an epoch: {total * len(loader):.0f} s an epoch')
    print('| forward of | mean ms |\n|---|---|')
    for name, value in sorted(spent.items(), key=lambda kv: -kv[1]):
        print(f'| {name} | {value / args.iters * 1e3:.1f} |')

    val_loader = runner.build_dataloader(cfg.val_dataloader)
    evaluator = runner.build_evaluator(cfg.val_evaluator)
    evaluator.dataset_meta = val_loader.dataset.metainfo
    model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        for batch in val_loader:
            evaluator.process(model.val_step(batch), batch)
    inferred = time.perf_counter()
    evaluator.evaluate(len(val_loader.dataset))
    print(f'validation: {inferred - start:.1f} s inference ({len(val_loader.dataset)} images), '
          f'{time.perf_counter() - inferred:.1f} s evaluation')


if __name__ == '__main__':
    main()
