"""Candidate rules for choosing alpha from the labeled set alone: each scores every alpha from its held-out
pseudo-labels (pipeline/stage1/held_out.py); the highest score wins (ties: the first, i.e. the smallest alpha).

The student learns from the kept pixels and nothing from the ignored ones, so a rule weighs the kept errors
(which teach it wrong) against the correct pixels removed (which it no longer sees):

    kept-correct      fraction of all pixels kept and right: ignoring a pixel never raises it, so it
                      favours the alpha that filters least (the baseline "do not filter"; the paper rule's
                      large sets can still lose to a smaller set, by relabelling background)
    miou-ignore-miss  mean IoU of the masks, an ignored pixel a miss of its true class
    miou-ignore-half  the same, an ignored pixel half a miss (the student can still learn it from its
                      labeled neighbours and from stage II)
    miou-kept         mean IoU on the kept pixels only: ignoring costs nothing, so it filters hardest
    noise-2% / 5%     the alpha keeping most pixels among those whose kept pixels are at most 2% / 5% wrong
                      (if none is, the one with the fewest wrong)
    worst-class       the lowest per-class IoU, ignore a miss: no class sacrificed to the others
"""

from __future__ import annotations

import numpy as np

from pipeline.stage1.held_out import HeldOut


def class_iou(conf: np.ndarray, ignored_weight: float) -> np.ndarray:
    """(A, K) IoU per class from (A, K, K + 1) confusions: TP / (TP + FP + wrong FN + w * ignored)."""
    kept = conf[..., :-1]
    tp = np.diagonal(kept, axis1=-2, axis2=-1).astype(np.float64)
    union = kept.sum(-2) + kept.sum(-1) - tp + ignored_weight * conf[..., -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.maximum(union, 1e-12), np.nan)


def _miou(weight: float):
    return lambda h: np.nanmean(class_iou(h.confusion, weight), axis=1)


def _noise(bound: float):
    def score(h: HeldOut) -> np.ndarray:
        error = 1 - np.nan_to_num(h.accuracy, nan=0.0)
        return np.where(error <= bound, h.kept, -error)  # any alpha under the bound beats every one above it
    return score


RULES = {
    "kept-correct": lambda h: h.kept * np.nan_to_num(h.accuracy, nan=0.0),
    "miou-ignore-miss": _miou(1.0),
    "miou-ignore-half": _miou(0.5),
    "miou-kept": _miou(0.0),
    "noise-2%": _noise(0.02),
    "noise-5%": _noise(0.05),
    "worst-class": lambda h: np.nanmin(class_iou(h.confusion, 1.0), axis=1),
}


def scores(held: HeldOut, rule: str) -> np.ndarray:
    """(A,) the rule's score of each of ``held``'s alphas: higher is better."""
    return np.asarray(RULES[rule](held), dtype=np.float64)


def choose(held: HeldOut, rule: str) -> int:
    """Index into ``held.alphas`` of the rule's choice."""
    if not held.alphas:
        raise ValueError("no alpha has a finite threshold in every fold")
    return int(np.nanargmax(scores(held, rule)))
