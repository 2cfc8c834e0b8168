"""ResNet whose dilated stages follow torchvision's rule (for the DC5 variant)."""
from mmdet.models.backbones import ResNet
from mmdet.models.backbones.resnet import Bottleneck

from ...registry import MODELS


@MODELS.register_module()
class DilatedResNet(ResNet):
    """mmdet's ``ResNet``, but the first block of a dilated stage keeps the previous
    stage's dilation, as torchvision's ``replace_stride_with_dilation`` does.

    mmdet dilates every block of the stage; the paper's DC5 model (and its released
    checkpoint) uses torchvision's ResNet. Arguments are ``ResNet``'s; the
    parameters are the same, only the first 3x3 conv of the stage differs.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        previous = 1
        for dilation, name in zip(self.dilations, self.res_layers):
            first = getattr(self, name)[0]
            if dilation != previous:
                if not isinstance(first, Bottleneck):
                    raise ValueError('DilatedResNet supports Bottleneck ResNets (depth >= 50)')
                first.conv2.dilation = (previous, previous)
                first.conv2.padding = (previous, previous)
            previous = dilation
