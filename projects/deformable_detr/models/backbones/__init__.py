from .dilated_resnet import DilatedResNet

__all__ = ['DilatedResNet']
