"""DeepLabV3+ (Chen et al. 2018): ResNet backbone at output stride 16, ASPP with rates 6/12/18,
a decoder fusing 1/4-resolution features, logits upsampled to the input size."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainer.models.resnet import ResNet


def conv_bn_relu(cin: int, cout: int, kernel: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=dilation * (kernel // 2), dilation=dilation,
                                   bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ASPP(nn.Module):
    def __init__(self, cin: int, cout: int, rates=(6, 12, 18)):
        super().__init__()
        self.branches = nn.ModuleList([conv_bn_relu(cin, cout)] + [conv_bn_relu(cin, cout, 3, r) for r in rates])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), conv_bn_relu(cin, cout))
        # no dropout after the projection, as in UniMatch's network: its pseudo-labels come from a training-mode
        # pass, which dropout would make noisy (the Sequential keeps the state-dict keys of earlier versions)
        self.project = nn.Sequential(conv_bn_relu(cout * (len(rates) + 2), cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.interpolate(self.pool(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.project(torch.cat([b(x) for b in self.branches] + [pooled], 1))


class DeepLabV3Plus(nn.Module):
    def __init__(self, num_classes: int, backbone: str = "resnet101", channels: int = 256,
                 rates=(6, 12, 18)):
        super().__init__()
        self.backbone = ResNet(backbone, output_stride=16)
        channels = min(channels, self.backbone.high_channels // 4)  # the tiny backbone gets a small head
        self.aspp = ASPP(self.backbone.high_channels, channels, rates)
        low = max(8, channels * 48 // 256)
        self.reduce = conv_bn_relu(self.backbone.low_channels, low)
        self.fuse = nn.Sequential(conv_bn_relu(channels + low, channels, 3), conv_bn_relu(channels, channels, 3))
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two features the head reads: low level (1/4) and high level (1/16)."""
        return tuple(self.backbone(x))

    def decode(self, features) -> torch.Tensor:
        """Logits at 1/4 of the input size."""
        low, high = features
        high = F.interpolate(self.aspp(high), size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.classifier(self.fuse(torch.cat([high, self.reduce(low)], 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits at the input size."""
        return F.interpolate(self.decode(self.encode(x)), size=x.shape[-2:], mode="bilinear", align_corners=False)
