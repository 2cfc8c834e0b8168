"""Training hooks of the ``ddetr`` scope, one per file."""
from .preemption_hook import PREEMPTED_EXIT_CODE, Preempted, PreemptionHook

__all__ = ['PreemptionHook', 'Preempted', 'PREEMPTED_EXIT_CODE']
