"""The losses the stages and stage II methods share: cross-entropy that ignores 255 and padding, the
same against confident pseudo-labels only, the run's `Criterion` holding both with the recipe's class
weights, and CutMix with a neighbour in the batch."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.labels import IGNORE


def ce(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor,
       weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy over pixels that are neither ignore (255) nor padding; 0 when there are none. With
    class weights, a pixel's term is scaled by its target class's weight (the mean stays over pixels)."""
    target = target.masked_fill(~valid, IGNORE)
    total = F.cross_entropy(logits.float(), target, weight=weight, ignore_index=IGNORE, reduction="sum")
    return total / (target != IGNORE).sum().clamp_min(1)


def confident_ce(logits: torch.Tensor, pseudo: torch.Tensor, conf: torch.Tensor, valid: torch.Tensor,
                 threshold: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy against pseudo-labels where their confidence reaches the threshold, summed and divided
    by all non-padding pixels (as UniMatch and FixMatch do: fewer confident pixels, a smaller loss)."""
    per_pixel = F.cross_entropy(logits.float(), pseudo, weight=weight, reduction="none")
    return (per_pixel * ((conf >= threshold) & valid)).sum() / valid.sum().clamp_min(1)


@dataclass(frozen=True)
class Criterion:
    """A run's cross-entropies: the recipe's class weights (None: every class weighs 1) on every term, and
    stage II's confidence threshold for pseudo-labels."""

    threshold: float = 0.95
    weight: torch.Tensor | None = None

    def ce(self, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return ce(logits, target, valid, self.weight)

    def confident_ce(self, logits: torch.Tensor, pseudo: torch.Tensor, conf: torch.Tensor,
                     valid: torch.Tensor) -> torch.Tensor:
        return confident_ce(logits, pseudo, conf, valid, self.threshold, self.weight)


def neighbour_mix(box: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """CutMix within the batch: inside image i's box, every tensor takes image i-1's values. ``box`` is
    (B, H, W) bool; tensors are (B, H, W) or (B, C, H, W)."""
    other = torch.roll(torch.arange(box.shape[0], device=box.device), 1)
    return [torch.where(box[:, None] if t.dim() == 4 else box, t[other], t) for t in tensors]


def class_weights(kind: str, counts: np.ndarray) -> np.ndarray:
    """Class weights from ``counts`` (images, classes): each labeled image's pixels per class. Scaled so that an
    average labeled pixel weighs 1 (the loss keeps its size).

    ``median-frequency`` (Eigen & Fergus 2015; SegNet's CamVid training): a class's frequency is its pixels over
    the pixels of the images that hold it, its weight the median frequency over its own; a class no labeled image
    holds gets the largest weight. ``enet`` (Paszke et al. 2016): 1 / ln(1.02 + the class's share of the pixels),
    bounded and milder: on CamVid 1/2's labeled masks the rarest class weighs 13x the commonest, against 57x."""
    counts = np.asarray(counts, np.float64)
    pixels = counts.sum(0)
    seen = pixels > 0
    if not seen.any():
        raise ValueError("no labeled pixel to weigh the classes by")
    if kind == "enet":
        weight = 1 / np.log(1.02 + pixels / pixels.sum())
    elif kind == "median-frequency":
        holding = ((counts > 0) * counts.sum(1, keepdims=True)).sum(0)
        frequency = pixels[seen] / holding[seen]
        weight = np.zeros(counts.shape[1])
        weight[seen] = np.median(frequency) / frequency
        weight[~seen] = weight[seen].max()
    else:
        raise ValueError(f"unknown class weighting {kind!r}")
    return weight / (weight * pixels).sum() * pixels.sum()
