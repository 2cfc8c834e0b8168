"""Size and time of one training checkpoint save of a config's model.

    python tools/analysis_tools/benchmark_checkpoint_save.py CONFIG --out DIR [--repeat 3]

The checkpoint holds what a training checkpoint holds: the weights, AdamW's state (after
one step) and, if the config has an EMAHook, the second weight set; it is written as
``ddetr.CheckpointHook`` writes (``torch.save`` to memory, then a temporary file in
``DIR``, synced and renamed), and removed afterwards. Training logs every save's
duration too (``saved iter_N.pth in X s``).
"""
import argparse
import io
import os
import os.path as osp
import sys
import time

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

import torch  # noqa: E402
from mmdet.registry import MODELS  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402

import projects.deformable_detr  # noqa: E402,F401
from projects.deformable_detr.checkpoint import atomic_write  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('config')
    parser.add_argument('--out', required=True, help='a folder on the disk to measure')
    parser.add_argument('--repeat', type=int, default=3)
    args = parser.parse_args()
    init_default_scope('mmdet')
    cfg = Config.fromfile(args.config)
    cfg.model.backbone.init_cfg = None  # no download
    model = MODELS.build(cfg.model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()  # creates its state
    checkpoint = dict(state_dict=model.state_dict(), optimizer=optimizer.state_dict())
    ema = any(h.get('type') == 'EMAHook' for h in cfg.get('custom_hooks', []))
    if ema:
        checkpoint['ema_state_dict'] = {f'module.{k}': v.clone()
                                        for k, v in model.state_dict().items()}
    path = osp.join(args.out, 'checkpoint_save_probe.pth')
    print(f'{args.config}: weights, AdamW state{", EMA" if ema else ""}')
    for _ in range(args.repeat):
        start = time.perf_counter()
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write(path, buffer.getvalue())
        print(f'{osp.getsize(path) / 2**20:.0f} MiB saved in {time.perf_counter() - start:.2f} s',
              flush=True)
    os.remove(path)


if __name__ == '__main__':
    main()
