from .cpu_amp_optim_wrapper import CPUAmpOptimWrapper, setup_amp

__all__ = ['CPUAmpOptimWrapper', 'setup_amp']
