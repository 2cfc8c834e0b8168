"""Training hooks of the non-finite tests, imported by their configs (``custom_imports``)
with this folder on PYTHONPATH.

- ``InjectNaNHook``: at the iterations listed in ``NAN_AT_ITERS`` (1-based, comma
  separated; none when unset), and only on the ranks listed in ``NAN_RANKS`` (all when
  unset), puts one NaN pixel into the first image of the batch, as a corrupt input
  would bring one (the data preprocessor takes float images as they are); with
  ``NAN_IN=neck`` (a module of the model) it makes that module's output infinite
  instead, for that iteration, as an overflow inside the network would.
- ``CollectiveInForwardHook``: with several processes, an all-reduce in every forward
  pass of the backbone, as SyncBatchNorm makes.
- ``RecordStateHook``: after every iteration, one json line in
  ``WORK_DIR/state_rank{R}.jsonl``: how much the step changed the parameters, the
  buffers and the optimizer state (largest absolute difference), and whether all of
  them are finite afterwards.
"""
import json
import os
import os.path as osp
from typing import Dict, List

import torch
from mmdet.registry import HOOKS
from mmengine.dist import all_reduce, get_rank, get_world_size
from mmengine.hooks import Hook


def _listed(name: str) -> List[int]:
    return [int(v) for v in os.environ.get(name, '').split(',') if v.strip()]


def _model(runner) -> torch.nn.Module:
    return getattr(runner.model, 'module', runner.model)


def _times_inf(module, args, output):
    if isinstance(output, (tuple, list)):
        return type(output)(o * float('inf') for o in output)
    return output * float('inf')


@HOOKS.register_module()
class InjectNaNHook(Hook):
    priority = 'VERY_HIGH'
    handle = None

    def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
        ranks = _listed('NAN_RANKS')
        if runner.iter + 1 not in _listed('NAN_AT_ITERS') or (ranks and get_rank() not in ranks):
            return
        where = os.environ.get('NAN_IN', 'image')
        if where != 'image':
            self.handle = getattr(_model(runner), where).register_forward_hook(_times_inf)
            return
        image = data_batch['inputs'][0].float()
        image[0, image.shape[1] // 2, image.shape[2] // 2] = float('nan')
        data_batch['inputs'][0] = image

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


@HOOKS.register_module()
class CollectiveInForwardHook(Hook):

    def before_train(self, runner) -> None:
        if get_world_size() > 1:
            _model(runner).backbone.register_forward_hook(
                lambda module, args, output: all_reduce(torch.zeros(1)))


def _state(runner) -> Dict[str, List[torch.Tensor]]:
    model = _model(runner)
    optimizer = runner.optim_wrapper.optimizer
    optim = [value for group in optimizer.param_groups for p in group['params']
             for _, value in sorted(optimizer.state.get(p, {}).items())
             if isinstance(value, torch.Tensor)]
    return dict(params=[p.detach().clone() for p in model.parameters()],
                buffers=[b.clone() for b in model.buffers()],
                optim=[v.clone() for v in optim])


def _max_diff(before: List[torch.Tensor], after: List[torch.Tensor]) -> float:
    if len(before) != len(after):  # the optimizer made its state: a step was taken
        return float('inf')
    return max([(a.double() - b.double()).abs().max().item()
                for a, b in zip(after, before) if a.numel()] + [0.0])


@HOOKS.register_module()
class RecordStateHook(Hook):

    def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
        self.before = _state(runner)

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        after = _state(runner)
        line = dict(iter=runner.iter + 1, rank=get_rank(),
                    finite=all(torch.isfinite(t).all().item()
                               for ts in after.values() for t in ts if t.is_floating_point()))
        for key in after:
            line[f'{key}_diff'] = _max_diff(self.before[key], after[key])
        with open(osp.join(runner.work_dir, f'state_rank{get_rank()}.jsonl'), 'a') as f:
            f.write(json.dumps(line) + '\n')
