"""SegFormer (Xie et al. 2021): a MiT encoder and the all-MLP decoder, logits upsampled to the input."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainer.models.mit import MixTransformer


class SegFormer(nn.Module):
    def __init__(self, num_classes: int, backbone: str = "mit-b5", embed: int | None = None):
        super().__init__()
        self.backbone = MixTransformer(backbone)
        embed = embed or (256 if backbone in ("mit-b0", "mit-b1") else 64 if backbone == "mit-tiny" else 768)
        self.project = nn.ModuleList(nn.Conv2d(d, embed, 1) for d in self.backbone.dims)  # per-stage linear layer
        self.fuse = nn.Sequential(nn.Conv2d(4 * embed, embed, 1, bias=False), nn.BatchNorm2d(embed), nn.ReLU(True))
        self.dropout = nn.Dropout2d(0.1)
        self.classifier = nn.Conv2d(embed, num_classes, 1)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four stages' features (1/4 .. 1/32)."""
        return list(self.backbone(x))

    def decode(self, features) -> torch.Tensor:
        """Logits at 1/4 of the input size."""
        size = features[0].shape[-2:]
        fused = [F.interpolate(p(f), size=size, mode="bilinear", align_corners=False) if i else p(f)
                 for i, (p, f) in enumerate(zip(self.project, features))]
        return self.classifier(self.dropout(self.fuse(torch.cat(fused[::-1], 1))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits at the input size."""
        return F.interpolate(self.decode(self.encode(x)), size=x.shape[-2:], mode="bilinear", align_corners=False)
