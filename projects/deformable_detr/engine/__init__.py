"""The training engine: hooks, the CPU AMP wrapper, the grouped optimizer constructor,
RNG states, launch helpers."""
from .hooks import (CheckpointFitHook, CheckpointHook, ExactResumeHook, FineTuneHook,
                    PreemptionHook, SkipNonFiniteHook)
from .optimizers import CPUAmpOptimWrapper, GroupedOptimWrapperConstructor

__all__ = ['CheckpointFitHook', 'ExactResumeHook', 'CheckpointHook', 'FineTuneHook',
           'PreemptionHook', 'SkipNonFiniteHook', 'CPUAmpOptimWrapper',
           'GroupedOptimWrapperConstructor']
