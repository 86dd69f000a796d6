"""Confusion matrices and IoU: the one implementation every stage reports with."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.labels import IGNORE


def confusion(pred, target, num_classes: int, pred_classes: int | None = None) -> np.ndarray:
    """(K, P) int64 counts, rows = true class, cols = predicted; target pixels == 255 skipped.

    P = ``pred_classes`` (default K): K + 1 counts a prediction of "ignore" (coded K) in the last column.
    """
    cols = pred_classes or num_classes
    pred = torch.as_tensor(pred).reshape(-1).long()
    target = torch.as_tensor(target).reshape(-1).long()
    valid = target != IGNORE
    index = target[valid] * cols + pred[valid]
    return torch.bincount(index, minlength=num_classes * cols).reshape(num_classes, cols).numpy()


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
