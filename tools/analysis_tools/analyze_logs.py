"""Training curves and training time from MMEngine json logs.

    python tools/analysis_tools/analyze_logs.py plot_curve LOG.json [LOG2.json] \
        --keys loss coco/bbox_mAP --legend run1 run2 --out curves.png
    python tools/analysis_tools/analyze_logs.py cal_train_time LOG.json

LOG.json is ``WORK_DIR/TIMESTAMP/vis_data/TIMESTAMP.json`` or ``scalars.json`` next to
it: one json dict a line, written by MMEngine's LoggerHook / LocalVisBackend. Training
lines carry ``step`` (the iteration), ``loss``, ``lr``, ``time``...; validation lines
carry the metrics (``coco/bbox_mAP``) and ``step`` (epoch, or iteration for
iteration-based loops).
"""
import argparse
import json
from collections import defaultdict
from typing import Dict, List

import numpy as np


def load_json_log(path: str) -> Dict[str, List[dict]]:
    """Splits a log into ``train`` and ``val`` lines (``val``: those without ``lr``)."""
    lines = {'train': [], 'val': []}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            entry = json.loads(line)
            if 'step' not in entry:
                continue
            lines['train' if 'lr' in entry else 'val'].append(entry)
    return lines


def plot_curve(args: argparse.Namespace) -> None:
    """One subplot per key, one line per log; train keys over iterations."""
    import matplotlib
    if args.out:
        matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    logs = [load_json_log(p) for p in args.json_logs]
    legends = args.legend or [p.rsplit('/', 1)[-1] for p in args.json_logs]
    if len(legends) != len(logs):
        raise ValueError(f'{len(legends)} legends for {len(logs)} logs')
    if args.style:
        plt.style.use(args.style)
    fig, axes = plt.subplots(len(args.keys), 1, squeeze=False,
                             figsize=(8, 3 * len(args.keys)))
    for ax, key in zip(axes[:, 0], args.keys):
        plotted = False
        for log, legend in zip(logs, legends):
            for split in ('train', 'val'):
                points = [(e['step'], e[key]) for e in log[split] if key in e]
                if not points:
                    continue
                if split == 'train' and args.start_iter:
                    points = [p for p in points if p[0] >= args.start_iter]
                xs, ys = zip(*points)
                xlabel = 'iter' if split == 'train' or not log['train'] or \
                    'epoch' not in log['train'][0] else 'epoch'
                marker = 'o' if split == 'val' else None
                ax.plot(xs, ys, label=f'{legend}: {key}', marker=marker, linewidth=1)
                ax.set_xlabel(xlabel)
                plotted = True
        if not plotted:
            raise KeyError(f'no log has the key {key!r}')
        ax.set_ylabel(key)
        ax.legend()
        ax.grid(alpha=0.3)
    if args.title:
        fig.suptitle(args.title)
    fig.tight_layout()
    if args.out:
        fig.savefig(args.out, dpi=100)
        print(f'saved the curves to {args.out}')
    else:
        plt.show()
    plt.close(fig)


def cal_train_time(args: argparse.Namespace) -> None:
    """Average time per iteration (and per epoch, slowest / fastest, if epochs)."""
    for path in args.json_logs:
        train = load_json_log(path)['train']
        times = [e['time'] for e in train if 'time' in e]
        if args.include_outliers is False:
            times = times[1:]  # the first logged interval includes start-up costs
        if not times:
            print(f'{path}: no timed training lines')
            continue
        print(f'{"-" * 5}Analyze train time of {path}{"-" * 5}')
        by_epoch = defaultdict(list)
        for e in train:
            if 'time' in e and 'epoch' in e:
                by_epoch[e['epoch']].append(e['time'])
        if len(by_epoch) > 1:
            means = {ep: float(np.mean(t)) for ep, t in by_epoch.items()}
            slowest, fastest = max(means, key=means.get), min(means, key=means.get)
            print(f'slowest epoch {slowest}, average time is {means[slowest]:.4f} s/iter')
            print(f'fastest epoch {fastest}, average time is {means[fastest]:.4f} s/iter')
            print(f'time std over epochs is {np.std(list(means.values())):.4f}')
        print(f'average iter time: {np.mean(times):.4f} s/iter')
        last = train[-1]
        if 'step' in last:
            print(f'{last["step"]} iterations logged, about '
                  f'{np.mean(times) * last["step"] / 3600:.2f} h of training')


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Analyze json logs')
    sub = parser.add_subparsers(dest='task', required=True)
    plot = sub.add_parser('plot_curve', help='plot curves to a file or the screen')
    plot.add_argument('json_logs', nargs='+', help='json log files')
    plot.add_argument('--keys', nargs='+', default=['loss'], help='keys to plot')
    plot.add_argument('--start-iter', type=int, default=0, help='first training iteration')
    plot.add_argument('--title', help='figure title')
    plot.add_argument('--legend', nargs='+', help='one legend per log')
    plot.add_argument('--style', help='matplotlib style, e.g. ggplot')
    plot.add_argument('--out', help='save the figure here (PNG, PDF...)')
    timing = sub.add_parser('cal_train_time', help='training time per iteration')
    timing.add_argument('json_logs', nargs='+', help='json log files')
    timing.add_argument('--include-outliers', action='store_true',
                        help='keep the first logged interval (start-up) in the average')
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    for path in args.json_logs:
        if not path.endswith('.json'):
            raise ValueError(f'expected a .json log, got {path}')
    {'plot_curve': plot_curve, 'cal_train_time': cal_train_time}[args.task](args)


if __name__ == '__main__':
    main()
