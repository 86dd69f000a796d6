"""ResNet-50/101 in torchvision's layout (so torchvision ImageNet state dicts load as they are), with
the last stage dilated for output stride 16, as DeepLabV3+ uses it."""

from __future__ import annotations

import torch
from torch import nn

DEPTHS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3), "resnet-tiny": (1, 1, 1, 1)}
WIDTHS = {"resnet50": 64, "resnet101": 64, "resnet-tiny": 8}


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet(nn.Module):
    """Returns (layer1 features at 1/4, layer4 features at 1/16)."""

    def __init__(self, name: str = "resnet101", output_stride: int = 16):
        super().__init__()
        if name not in DEPTHS:
            raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(DEPTHS)}")
        if output_stride not in (8, 16):
            raise ValueError("output_stride must be 8 or 16")
        width, depths = WIDTHS[name], DEPTHS[name]
        self.inplanes, self.dilation = width, 1
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        dilate = (False, output_stride == 8, True)
        self.layer1 = self._layer(width, depths[0])
        self.layer2 = self._layer(width * 2, depths[1], 2, dilate[0])
        self.layer3 = self._layer(width * 4, depths[2], 2, dilate[1])
        self.layer4 = self._layer(width * 8, depths[3], 2, dilate[2])
        self.low_channels, self.high_channels = width * 4, width * 32
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _layer(self, planes: int, blocks: int, stride: int = 1, dilate: bool = False) -> nn.Sequential:
        previous = self.dilation
        if dilate:  # torchvision's rule: the stride becomes dilation from the second block on
            self.dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * 4, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes * 4))
        layers = [Bottleneck(self.inplanes, planes, stride, previous, downsample)]
        self.inplanes = planes * 4
        layers += [Bottleneck(self.inplanes, planes, dilation=self.dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        low = self.layer1(x)
        return low, self.layer4(self.layer3(self.layer2(low)))
