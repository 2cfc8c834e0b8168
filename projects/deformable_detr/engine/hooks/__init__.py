from .exact_resume_hook import CheckpointHook, ExactResumeHook
from .fine_tune_hook import FineTuneHook
from .skip_non_finite_hook import SkipNonFiniteHook

__all__ = ['ExactResumeHook', 'CheckpointHook', 'FineTuneHook', 'SkipNonFiniteHook']
