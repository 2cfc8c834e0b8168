"""Plot training curves of one or more MMEngine work dirs: loss and bbox mAP per epoch.

With one work dir this is the training curve of a run; with several (say Deformable DETR
and DETR trained on the same data and budget) it compares their convergence, per epoch
and per second of training.

    python tools/analysis_tools/plot_convergence.py work_dirs/ddetr work_dirs/detr \
        --labels "Deformable DETR" DETR --out convergence.png

Reads ``WORK_DIR/<timestamp>/vis_data/scalars.json`` (the newest run that has
validation results), which MMEngine's LoggerHook writes: one JSON object per line,
training lines carry ``epoch``, ``loss`` and ``time``, validation lines ``coco/*``.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
from collections import defaultdict

import matplotlib

matplotlib.use('Agg')  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def find_scalars(work_dir: str, metric: str) -> str:
    """Newest ``scalars.json`` under ``work_dir`` that logged ``metric``."""
    paths = sorted(glob.glob(os.path.join(work_dir, '*', 'vis_data', 'scalars.json')),
                   reverse=True)  # timestamped folders: newest first
    for path in paths:
        with open(path) as f:
            if any(metric in line for line in f):
                return path
    raise FileNotFoundError(f'no scalars.json with {metric!r} under {work_dir}')


def load_run(path: str, metric: str) -> dict[str, list[float]]:
    """Per-epoch mean training loss, cumulative training seconds and ``metric``."""
    loss = defaultdict(list)
    val: dict[int, float] = {}
    elapsed: dict[int, float] = {}  # training seconds up to the end of each epoch
    total, last_iter = 0.0, 0
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            if metric in rec:  # validation line: ``step`` is the epoch
                val[int(rec['step'])] = float(rec[metric])
            elif 'loss' in rec and 'epoch' in rec:
                loss[int(rec['epoch'])].append(float(rec['loss']))
                # ``time`` is the mean seconds per iteration over the logging window:
                # times the iterations since the last line, the time they took
                it = int(rec.get('iter', last_iter))
                total += float(rec.get('time', 0)) * max(it - last_iter, 0)
                last_iter = it
                elapsed[int(rec['epoch'])] = total
    epochs = sorted(val)
    return dict(
        loss_epoch=sorted(loss), loss=[sum(v) / len(v) for _, v in sorted(loss.items())],
        epoch=epochs, metric=[val[e] for e in epochs],
        seconds=[elapsed.get(e, float('nan')) for e in epochs])


def plot(runs: dict[str, dict], metric: str, out: str) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for label, r in runs.items():
        axes[0].plot(r['loss_epoch'], r['loss'], marker='o', label=label)
        axes[1].plot(r['epoch'], r['metric'], marker='o', label=label)
        axes[2].plot([s / 60 for s in r['seconds']], r['metric'], marker='o', label=label)
    axes[0].set(xlabel='epoch', ylabel='mean training loss', title='loss')
    axes[0].set_yscale('log')
    axes[1].set(xlabel='epoch', ylabel=metric, title=f'{metric} per epoch')
    axes[2].set(xlabel='training minutes', ylabel=metric, title=f'{metric} per minute')
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('work_dirs', nargs='+', help='MMEngine work dirs')
    parser.add_argument('--labels', nargs='+', help='legend labels (default: dir names)')
    parser.add_argument('--metric', default='coco/bbox_mAP')
    parser.add_argument('--out', default='convergence.png')
    args = parser.parse_args(argv)
    labels = args.labels or [os.path.basename(os.path.normpath(d)) for d in args.work_dirs]
    if len(labels) != len(args.work_dirs):
        parser.error('give one label per work dir')
    runs = {}
    for label, work_dir in zip(labels, args.work_dirs):
        runs[label] = load_run(find_scalars(work_dir, args.metric), args.metric)
        r = runs[label]
        print(f'{label}: ' + ', '.join(f'ep{e} {m:.3f} ({s / 60:.1f} min)' for e, m, s
                                       in zip(r['epoch'], r['metric'], r['seconds'])))
    plot(runs, args.metric, args.out)
    print(f'saved {args.out}')


if __name__ == '__main__':
    main()
