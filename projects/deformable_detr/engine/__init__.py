"""The training engine: hooks, the CPU AMP wrapper, RNG states, launch helpers."""
from .hooks import CheckpointHook, ExactResumeHook, FineTuneHook, SkipNonFiniteHook
from .optimizers import CPUAmpOptimWrapper

__all__ = ['ExactResumeHook', 'CheckpointHook', 'FineTuneHook', 'SkipNonFiniteHook',
           'CPUAmpOptimWrapper']
