"""The training engine: hooks, the CPU AMP wrapper, the grouped optimizer constructor,
RNG states, launch helpers."""
from .hooks import CheckpointHook, ExactResumeHook, FineTuneHook, PreemptionHook, SkipNonFiniteHook
from .optimizers import CPUAmpOptimWrapper, GroupedOptimWrapperConstructor

__all__ = ['ExactResumeHook', 'CheckpointHook', 'FineTuneHook', 'PreemptionHook',
           'SkipNonFiniteHook', 'CPUAmpOptimWrapper', 'GroupedOptimWrapperConstructor']
