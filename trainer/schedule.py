"""Schedules: the unlabeled-loss weight lambda(t) and the poly learning-rate decay."""

from __future__ import annotations

import math


def unlabeled_weight(progress: float, start: float, end: float, kind: str = "exp") -> float:
    """lambda(t) for t = progress through training (stage I then II, one schedule) in [0, 1].

    ``exp`` (default, the paper's shape; its constants are unpublished): start * (end/start)^t, an
    exponential decay from start to end. ``linear``: straight from start to end. ``constant``: start.
    """
    t = min(max(progress, 0.0), 1.0)
    if kind == "constant":
        return start
    if kind == "linear" or start == 0 or end == 0:
        return start + (end - start) * t
    return start * math.exp(t * math.log(end / start))


def poly(step: int, total: int, power: float = 0.9) -> float:
    """The poly learning-rate factor (1 - step/total)^power."""
    return (1 - min(step, total) / max(total, 1)) ** power
