from .non_finite import NonFiniteError, check_losses, first_non_finite

__all__ = ['NonFiniteError', 'check_losses', 'first_non_finite']
