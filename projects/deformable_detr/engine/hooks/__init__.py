from .checkpoint_fit_hook import CheckpointFitHook
from .exact_resume_hook import CheckpointHook, ExactResumeHook
from .fine_tune_hook import FineTuneHook
from .preemption_hook import PREEMPTED_EXIT_CODE, Preempted, PreemptionHook
from .skip_non_finite_hook import SkipNonFiniteHook

__all__ = ['CheckpointFitHook', 'ExactResumeHook', 'CheckpointHook', 'FineTuneHook',
           'PreemptionHook', 'Preempted', 'PREEMPTED_EXIT_CODE', 'SkipNonFiniteHook']
