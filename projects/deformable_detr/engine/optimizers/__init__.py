from .cpu_amp_optim_wrapper import CPUAmpOptimWrapper, setup_amp
from .grouped_constructor import GroupedOptimWrapperConstructor

__all__ = ['CPUAmpOptimWrapper', 'GroupedOptimWrapperConstructor', 'setup_amp']
