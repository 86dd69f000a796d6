"""The annotator's own quality: the argmax of the stored scores against a split's masks (`eval --scores`)."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.stage1.conformal import bands
from pipeline.data.datasets import Dataset, Sample
from pipeline.metrics import confusion
from pipeline.stage0.store import LogitsStore


def raw_argmax(store: LogitsStore, image_id: str, band_elements: int = 1 << 23) -> torch.Tensor:
    """(H, W) class of the highest stored score, upsampled bilinearly to the image as calibration does (only the
    classes that can be highest somewhere: `bands`)."""
    return torch.cat([keep[full.argmax(0)] for _, _, keep, full in
                      bands(store.probabilities(image_id), store.image_size(image_id), band_elements=band_elements)])


def raw_confusion(store: LogitsStore, dataset: Dataset, samples: list[Sample], progress=None) -> np.ndarray:
    """(K, K) confusion of the raw argmax over the samples (ignore pixels left out)."""
    k = dataset.num_classes
    total = np.zeros((k, k), np.int64)
    for sample in samples:
        mask = dataset.read_mask(sample.mask, store.image_size(sample.id))
        total += confusion(raw_argmax(store, sample.id).numpy(), mask, k)
        if progress is not None:
            progress(1)
    return total
