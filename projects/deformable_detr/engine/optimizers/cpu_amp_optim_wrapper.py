"""``--amp`` on any machine: MMEngine's AMP wrapper on GPU, a bfloat16 one on CPU.

- :class:`CPUAmpOptimWrapper`: ``--amp`` on a machine without an accelerator;
- :func:`setup_amp`: picks the mixed-precision optimizer wrapper for ``--amp``.
"""
import logging

import torch
from mmengine.config import Config
from mmengine.logging import print_log
from mmengine.optim import AmpOptimWrapper, OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS


# In MMEngine's root registry, as MMEngine's own wrappers: found from every scope.
@OPTIM_WRAPPERS.register_module()
class CPUAmpOptimWrapper(AmpOptimWrapper):
    """``AmpOptimWrapper`` that also runs on CPU: bfloat16 autocast, no loss scaling.

    MMEngine's wrapper asserts an accelerator. bfloat16 keeps float32's exponent range,
    so it needs no loss scaler; a disabled ``torch.amp.GradScaler`` makes ``scale``,
    ``unscale_``, ``step`` and ``update`` plain pass-throughs.

    Args:
        loss_scale: Accepted for ``AmpOptimWrapper``'s signature; unused (no scaling).
        dtype: The autocast dtype: ``'bfloat16'`` (the only one CPU autocast here runs).
        **kwargs: ``OptimWrapper``'s arguments (optimizer, clip_grad...).
    """

    def __init__(self, loss_scale: str = 'dynamic', dtype: str = 'bfloat16', **kwargs):
        OptimWrapper.__init__(self, **kwargs)
        self._scale_update_param = None
        self.loss_scaler = torch.amp.GradScaler('cpu', enabled=False)
        self.cast_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        if self.cast_dtype != torch.bfloat16:
            raise ValueError(f'CPU autocast here supports bfloat16 only, got {dtype}')


def setup_amp(cfg: Config) -> None:
    """``--amp``: MMEngine's AmpOptimWrapper on GPU, its bfloat16 CPU variant otherwise.

    Args:
        cfg: The config; its ``optim_wrapper`` is changed in place.
    """
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
