"""The losses the stages and stage II methods share: cross-entropy that ignores 255 and padding, the
same against confident pseudo-labels only, and CutMix with a neighbour in the batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.stage1.masks import IGNORE


def ce(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over pixels that are neither ignore (255) nor padding; 0 when there are none."""
    target = target.masked_fill(~valid, IGNORE)
    total = F.cross_entropy(logits.float(), target, ignore_index=IGNORE, reduction="sum")
    return total / (target != IGNORE).sum().clamp_min(1)


def confident_ce(logits: torch.Tensor, pseudo: torch.Tensor, conf: torch.Tensor, valid: torch.Tensor,
                 threshold: float) -> torch.Tensor:
    """Cross-entropy against pseudo-labels where their confidence reaches the threshold, summed and divided
    by all non-padding pixels (as UniMatch and FixMatch do: fewer confident pixels, a smaller loss)."""
    per_pixel = F.cross_entropy(logits.float(), pseudo, reduction="none")
    return (per_pixel * ((conf >= threshold) & valid)).sum() / valid.sum().clamp_min(1)


def neighbour_mix(box: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """CutMix within the batch: inside image i's box, every tensor takes image i-1's values. ``box`` is
    (B, H, W) bool; tensors are (B, H, W) or (B, C, H, W)."""
    other = torch.roll(torch.arange(box.shape[0], device=box.device), 1)
    return [torch.where(box[:, None] if t.dim() == 4 else box, t[other], t) for t in tensors]
