"""Confusion matrices and IoU: the one implementation every stage reports with."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.masks import IGNORE


def confusion(pred, target, num_classes: int) -> np.ndarray:
    """(K, K) int64 counts, rows = true class, cols = predicted; target pixels == 255 skipped."""
    pred = torch.as_tensor(pred).reshape(-1).long()
    target = torch.as_tensor(target).reshape(-1).long()
    valid = target != IGNORE
    index = target[valid] * num_classes + pred[valid]
    return torch.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes).numpy()


def iou_per_class(conf: np.ndarray) -> np.ndarray:
    """IoU of each class; NaN for a class absent from both prediction and truth."""
    inter = np.diag(conf).astype(np.float64)
    union = conf.sum(0) + conf.sum(1) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, np.nan)


def mean_iou(conf: np.ndarray) -> float:
    return float(np.nanmean(iou_per_class(conf)))


def pixel_accuracy(conf: np.ndarray) -> float:
    total = conf.sum()
    return float(np.trace(conf) / total) if total else float("nan")
