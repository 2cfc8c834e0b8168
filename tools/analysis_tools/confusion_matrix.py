"""Confusion matrix of detections, from the predictions dumped by ``tools/test.py --out``.

    python tools/test.py CONFIG CHECKPOINT --out results.pkl
    python tools/analysis_tools/confusion_matrix.py CONFIG results.pkl SAVE_DIR

Rows are ground-truth classes, columns predicted classes; the last row and column are
background: a ground truth that no detection overlaps (IoU >= --tp-iou-thr) is counted
in the last column (missed), a detection that overlaps no ground truth of its class
in the last row (false positive). Detections below --score-thr are ignored.
"""
import argparse
import os
import os.path as osp
import sys
from typing import List, Optional, Sequence

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from mmengine.config import DictAction  # noqa: E402
from mmengine.fileio import load  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from mmengine.utils import ProgressBar  # noqa: E402
from projects.deformable_detr.engine.config_file import load_config  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Confusion matrix of detections')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('prediction_path', help='predictions from tools/test.py --out')
    parser.add_argument('save_dir', help='directory for confusion_matrix.png')
    parser.add_argument('--show', action='store_true', help='show the matrix')
    parser.add_argument('--color-theme', default='plasma', help='matplotlib colormap')
    parser.add_argument('--score-thr', type=float, default=0.3,
                        help='ignore detections scored below this')
    parser.add_argument('--tp-iou-thr', type=float, default=0.5,
                        help='IoU for a detection to match a ground truth')
    parser.add_argument('--nms-iou-thr', type=float,
                        help='class-wise NMS before matching (DETRs need none)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, key=value pairs')
    return parser.parse_args()


def image_confusion(matrix: np.ndarray, gt_bboxes: np.ndarray, gt_labels: np.ndarray,
                    bboxes: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                    score_thr: float, tp_iou_thr: float,
                    nms_iou_thr: Optional[float] = None) -> None:
    """Adds one image's matches to ``matrix`` ((C + 1) x (C + 1), last = background)."""
    from mmcv.ops import batched_nms
    from mmdet.structures.bbox import bbox_overlaps
    keep = scores >= score_thr
    bboxes, scores, labels = bboxes[keep], scores[keep], labels[keep]
    if nms_iou_thr is not None and len(bboxes):
        _, kept = batched_nms(torch.from_numpy(bboxes).float(),
                              torch.from_numpy(scores).float(),
                              torch.from_numpy(labels).long(),
                              dict(type='nms', iou_threshold=nms_iou_thr))
        kept = kept.numpy()
        bboxes, scores, labels = bboxes[kept], scores[kept], labels[kept]
    ious = bbox_overlaps(torch.from_numpy(gt_bboxes).float().reshape(-1, 4),
                         torch.from_numpy(bboxes).float().reshape(-1, 4)).numpy()
    background = matrix.shape[0] - 1
    true_positive = np.zeros(len(bboxes), dtype=bool)
    for i, gt_label in enumerate(gt_labels):
        overlapping = np.nonzero(ious[i] >= tp_iou_thr)[0] if ious.size else []
        for j in overlapping:
            matrix[gt_label, labels[j]] += 1
            true_positive[j] |= labels[j] == gt_label
        if len(overlapping) == 0:
            matrix[gt_label, background] += 1
    for j in np.nonzero(~true_positive)[0]:
        matrix[background, labels[j]] += 1


def calculate_confusion_matrix(dataset, results: Sequence[dict], score_thr: float,
                               tp_iou_thr: float,
                               nms_iou_thr: Optional[float] = None) -> np.ndarray:
    """Sums :func:`image_confusion` over the dataset; results matched by ``img_id``."""
    num_classes = len(dataset.metainfo['classes'])
    matrix = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)
    index = {dataset.get_data_info(i)['img_id']: i for i in range(len(dataset))}
    bar = ProgressBar(len(results))
    for result in results:
        info = dataset.get_data_info(index[result['img_id']])
        gts = [g for g in info['instances'] if not g.get('ignore_flag', 0)]
        gt_bboxes = np.array([g['bbox'] for g in gts], dtype=np.float32).reshape(-1, 4)
        gt_labels = np.array([g['bbox_label'] for g in gts], dtype=np.int64)
        pred = result['pred_instances']
        image_confusion(matrix, gt_bboxes, gt_labels, _numpy(pred['bboxes']),
                        _numpy(pred['scores']), _numpy(pred['labels']), score_thr,
                        tp_iou_thr, nms_iou_thr)
        bar.update()
    print()
    return matrix


def _numpy(x) -> np.ndarray:
    return x.cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def plot_confusion_matrix(matrix: np.ndarray, labels: List[str], save_dir: str,
                          show: bool = False, color_theme: str = 'plasma') -> str:
    """Draws the row-normalised matrix (percent of each ground-truth class)."""
    import matplotlib
    if not show:
        matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    rows = matrix.sum(axis=1, keepdims=True)
    percent = 100 * matrix / np.maximum(rows, 1)
    n = len(labels)
    size = max(4, 0.6 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.9), dpi=120)
    im = ax.imshow(percent, cmap=plt.get_cmap(color_theme), vmin=0, vmax=100)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title('Normalized Confusion Matrix (%)')
    ax.set_xlabel('Prediction')
    ax.set_ylabel('Ground Truth')
    ax.set_xticks(range(n), labels, rotation=45, ha='right')
    ax.set_yticks(range(n), labels)
    for i in range(n):
        for j in range(n):
            if matrix[i, j]:
                ax.text(j, i, f'{percent[i, j]:.0f}\n({matrix[i, j]})', ha='center',
                        va='center', fontsize=7,
                        color='w' if percent[i, j] < 50 else 'k')
    fig.tight_layout()
    os.makedirs(save_dir, exist_ok=True)
    out = osp.join(save_dir, 'confusion_matrix.png')
    fig.savefig(out)
    if show:
        plt.show()
    plt.close(fig)
    return out


def main() -> None:
    args = parse_args()
    cfg = load_config(args.config, args.cfg_options)  # imports its custom_imports
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    from mmdet.registry import DATASETS
    results = load(args.prediction_path)
    dataset_cfg = cfg.test_dataloader.dataset
    dataset_cfg.pipeline = []  # annotations only
    dataset = DATASETS.build(dataset_cfg)
    matrix = calculate_confusion_matrix(dataset, results, args.score_thr, args.tp_iou_thr,
                                        args.nms_iou_thr)
    labels = list(dataset.metainfo['classes']) + ['background']
    out = plot_confusion_matrix(matrix, labels, args.save_dir, args.show, args.color_theme)
    np.savetxt(osp.join(args.save_dir, 'confusion_matrix.txt'), matrix, fmt='%d',
               header=' '.join(labels))
    print(f'saved {out}')


if __name__ == '__main__':
    main()
