"""A tiny ResNet registered for tests, so a test trains in a fraction of resnet18's time (timm's tests do the same).

It is a torchvision `ResNet` (same forward, same `conv1`/`layer1..4`/`avgpool`/`fc` interface, so the default
head, CAM layer and stages of a `ModelSpec` apply) with one BasicBlock per stage and widths 8..64: 143 k
parameters instead of resnet18's 11.7 M; a 3-epoch engine test trains in ~1 s instead of ~10-20 s. No pretrained weights: configs use weights="none" (or a state-dict file).

    from tests.tinymodel import TINY_RESNET, register_tiny_resnet
    register_tiny_resnet()            # idempotent; then TrainConfig(model=TINY_RESNET, weights="none", ...)

Only the registering process knows it; a page or worker process learns it from its environment:
RESNET_LAB_MODEL_PLUGINS=tests.tinymodel:register_tiny_resnet (with the checkout on PYTHONPATH).
"""

from __future__ import annotations

from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from shared.training.models import ModelSpec, register_model

TINY_RESNET = "tiny_resnet"
WIDTHS = (8, 16, 32, 64)


class TinyResNet(ResNet):
    """torchvision's ResNet with BasicBlock, layers [1, 1, 1, 1] and stage widths `WIDTHS` (torchvision fixes
    them at 64..512, so the stages are built here with its own `_make_layer`)."""

    def __init__(self, num_classes: int = 1000, widths: tuple[int, int, int, int] = WIDTHS):
        nn.Module.__init__(self)  # ResNet.__init__ would build the full-width network first
        self._norm_layer = nn.BatchNorm2d
        self.inplanes, self.dilation, self.groups, self.base_width = widths[0], 1, 1, 64
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(BasicBlock, widths[0], 1)
        self.layer2 = self._make_layer(BasicBlock, widths[1], 1, stride=2)
        self.layer3 = self._make_layer(BasicBlock, widths[2], 1, stride=2)
        self.layer4 = self._make_layer(BasicBlock, widths[3], 1, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[3], num_classes)
        for module in self.modules():  # ResNet's own init: with PyTorch's default one it learns less reliably
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")


TINY_SPEC = ModelSpec(name=TINY_RESNET, builder=TinyResNet, feature_size=WIDTHS[-1])


def register_tiny_resnet() -> ModelSpec:
    """Register `tiny_resnet` in this process (again is a no-op) and return its spec."""
    return register_model(TINY_SPEC)
