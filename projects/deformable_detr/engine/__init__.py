"""The training engine: hooks, the CPU AMP wrapper, RNG states, launch helpers."""
from .hooks import CheckpointHook, ExactResumeHook, FineTuneHook, PreemptionHook, SkipNonFiniteHook
from .optimizers import CPUAmpOptimWrapper

__all__ = ['ExactResumeHook', 'CheckpointHook', 'FineTuneHook', 'PreemptionHook',
           'SkipNonFiniteHook', 'CPUAmpOptimWrapper']
