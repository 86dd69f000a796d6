"""What the masks would be worth at each alpha, from the labeled set alone: cross-calibrated pseudo-labels.

Each labeled image belongs to one of calibrate's folds. At every alpha asked for, thresholds are fitted on the
other folds (calibrate's own `fit`) and the image is pseudo-labelled with them by the same rule as the
unlabeled images. Against its ground truth that gives, per alpha, a held-out confusion (true class x label,
ignore as the last column): kept fraction, accuracy of what is kept, per-class figures, and the scores the
alpha rules (pipeline/stage1/alpha_rules.py) rank alphas by. The annotator's own top-1 accuracy comes from the same
pass. One read and one upsampling per image serves every alpha.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import reduce

import numpy as np
import torch

from pipeline.stage1.conformal import (ScoreHistogram, background_index, bands, fit, lift, position, prediction_sets,
                                       pseudo_label)
from pipeline.data.datasets import Dataset, Sample
from pipeline.errors import UserError
from pipeline.labels import IGNORE
from pipeline.metrics import confusion
from pipeline.parallel import in_threads
from pipeline.stage0.store import LogitsStore
from pipeline.ui import no_progress


@dataclass
class HeldOut:
    alphas: tuple[float, ...]  # those with a finite threshold in every fold
    confusion: np.ndarray  # (A, K, K + 1) int64: true class x held-out label, column K = ignored
    top1: np.ndarray  # (K, K) int64: true class x the annotator's argmax

    @property
    def kept(self) -> np.ndarray:
        """(A,) fraction of the labeled pixels the filter keeps."""
        return 1 - self.confusion[:, :, -1].sum(1) / max(1, int(self.top1.sum()))

    @property
    def accuracy(self) -> np.ndarray:
        """(A,) fraction of the kept pixels whose label is the true class (NaN where nothing is kept)."""
        kept = self.confusion[:, :, :-1].sum((1, 2))
        correct = np.trace(self.confusion[:, :, :-1], axis1=1, axis2=2)
        return np.where(kept > 0, correct / np.maximum(kept, 1), np.nan)

    @property
    def top1_accuracy(self) -> float:
        return float(np.trace(self.top1) / max(1, int(self.top1.sum())))

    def merge(self, other: "HeldOut") -> "HeldOut":
        return HeldOut(self.alphas, self.confusion + other.confusion, self.top1 + other.top1)


def fold_thresholds(hist: ScoreHistogram, alphas, mode: str) -> tuple[tuple[float, ...], torch.Tensor]:
    """(the alphas with a finite threshold in every fold, their thresholds (A, folds, K)), each fold's fitted
    on the other folds. An alpha that needs more calibration data than some k-1 folds hold is left out."""
    others = [hist.select([g for g in range(hist.folds) if g != f]) for f in range(hist.folds)]  # once, not per alpha
    kept, thresholds = [], []
    for alpha in alphas:
        try:
            q = [fit(rest, alpha, mode).q for rest in others]
        except UserError:
            continue
        kept.append(float(alpha))
        thresholds.append(torch.stack(q))
    empty = torch.empty(0, hist.folds, hist.num_classes)
    return tuple(kept), torch.stack(thresholds) if thresholds else empty


def held_out(store: LogitsStore, dataset: Dataset, samples: list[Sample], fold_of: dict[str, int],
             hist: ScoreHistogram, mode: str, rule: str, alphas, jobs: int = 1, progress=None) -> HeldOut:
    """The held-out confusions of the labeled ``samples`` at each alpha (see the module's doc)."""
    alphas, q = fold_thresholds(hist, alphas, mode)
    k = dataset.num_classes
    background = background_index(dataset.classes)

    def work_on(share: list[Sample]) -> HeldOut:
        conf, top1 = np.zeros((len(alphas), k, k + 1), np.int64), np.zeros((k, k), np.int64)
        for sample in share:
            size = store.image_size(sample.id)
            truth = torch.from_numpy(dataset.read_mask(sample.mask, size).astype(np.int64))
            fold = fold_of[sample.id]
            for start, stop, keep, full in bands(store.probabilities(sample.id), size, q[:, fold]):
                band, mine, bg, best = truth[start:stop], q[:, fold][:, keep], position(keep, background), full.max(0)
                top1 += confusion(keep[best.indices], band, k)
                for a in range(len(alphas)):
                    label = lift(pseudo_label(full, prediction_sets(full, mine[a]), rule, bg, best), keep).long()
                    conf[a] += confusion(label.masked_fill(label == IGNORE, k), band, k, k + 1)
            update(1)
        return HeldOut(alphas, conf, top1)

    with (progress or no_progress)("held-out") as update:
        update(0, len(samples))
        parts = in_threads(work_on, samples, jobs)
    return reduce(HeldOut.merge, parts)
