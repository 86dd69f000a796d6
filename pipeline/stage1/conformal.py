"""Conformal prediction on per-pixel class probabilities: scores, exact streaming quantiles, prediction sets.

Nonconformity of class k at a pixel is s_k = 1 - p_k, the probability coming from the stored scores
upsampled (bilinear) to the mask's resolution. Scores are rounded UP to the next float16 value: that
keeps every guarantee (a rounded-up score is never smaller) and makes them fall on a fixed grid of
15,361 values, the fp16 bit patterns of [0, 1], which sort like the values they encode. A per-class
count histogram over that grid then gives the EXACT k-th smallest rounded score at any n, in memory
that does not grow with the number of pixels or images.

A threshold q (one per class; equal for every class in `paper` and `crc` modes) puts class k in a
pixel's prediction set when s_k <= q. Because q is itself an fp16 value, comparing the unrounded fp32
score with q is the same as comparing the rounded one: calibration and mask writing agree exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from fractions import Fraction

import numpy as np
import torch

from pipeline.errors import UserError
from pipeline.labels import IGNORE

GRID = 0x3C00 + 1  # fp16 bit patterns 0 .. 0x3C00 = the values 0 .. 1.0
MODES = ("paper", "mondrian", "crc")
RULES = ("paper", "singleton", "argmax")  # argmax: no filtering (the raw-masks baseline of ablations)


def grid_values() -> torch.Tensor:
    """float32 (GRID,): the score each histogram bin stands for."""
    return torch.arange(GRID, dtype=torch.int16).view(torch.float16).float()


def nonconformity(p: torch.Tensor) -> torch.Tensor:
    """s = 1 - p, clamped to [0, 1] (bilinear upsampling may leave p a rounding error above 1)."""
    return (1 - p).clamp_(0, 1)


def to_bins(scores: torch.Tensor) -> torch.Tensor:
    """int64 bin of each score in [0, 1]: its fp16 bit pattern after rounding UP to the fp16 grid."""
    half = scores.half()  # round to nearest ...
    bins = half.view(torch.int16).long()
    return bins + (half.float() < scores)  # ... and one step up where that went down


def conformal_rank(n: int, alpha: float) -> int:
    """k = ceil((n+1)(1-alpha)), with alpha read as the decimal the user wrote (0.1 is exactly 1/10)."""
    return math.ceil((n + 1) * (1 - Fraction(str(alpha))))


def min_calibration(alpha: float) -> int:
    """The fewest calibration units for which k <= n, i.e. a finite threshold: ceil((1-alpha)/alpha)."""
    a = Fraction(str(alpha))
    return math.ceil((1 - a) / a)


def require_finite(n: int, alpha: float, what: str, advice: str) -> None:
    """Stop with the reason when n calibration units are too few for a finite threshold (alpha < 1/(n+1))."""
    if n < min_calibration(alpha):
        raise UserError(f"--alpha {alpha}: {what}; a finite threshold needs at least {min_calibration(alpha)} "
                        f"(alpha >= 1/(n+1)){advice}. Raise --alpha or label more images")


def check_alpha(alpha: float) -> None:
    if not 0 < alpha < 1:
        raise UserError(f"--alpha {alpha}: must be between 0 and 1 (e.g. 0.1 keeps 90% coverage)")


class Upsampler:
    """Bilinear resize (half-pixel centres, like F.interpolate with align_corners=False) from (h, w) to (H, W).

    `full` resizes every class; `at` evaluates one class per pixel with the same arithmetic in the same
    order, so `at(p, y) == full(p).gather(y)` bit for bit: calibration never has to upsample all K classes.
    """

    def __init__(self, src: tuple[int, int], dst: tuple[int, int]):
        self.src, self.dst = tuple(src), tuple(dst)
        self.y0, self.y1, self.wy0, self.wy1 = _axis(src[0], dst[0])
        self.x0, self.x1, self.wx0, self.wx1 = _axis(src[1], dst[1])
        self._offsets = None

    def full(self, p: torch.Tensor) -> torch.Tensor:
        """(K, h, w) -> (K, H, W)."""
        return self.rows(self.columns(p), 0, self.dst[0])

    def columns(self, p: torch.Tensor) -> torch.Tensor:
        """(K, h, w) -> (K, h, W): the first pass (the gather along the last axis runs on the small tensor)."""
        return p.index_select(2, self.x0).mul_(self.wx0).add_(p.index_select(2, self.x1).mul_(self.wx1))

    def rows(self, cols: torch.Tensor, start: int, stop: int, first: int = 0) -> torch.Tensor:
        """(K, rows, W) -> (K, stop - start, W): output rows start..stop-1, so big images can go in bands; ``cols``
        holds the source rows from ``first`` on (at least those the band uses, `source_rows`)."""
        band = slice(start, stop)
        out = cols.index_select(1, self.y0[band] - first).mul_(self.wy0[band, None])
        return out.add_(cols.index_select(1, self.y1[band] - first).mul_(self.wy1[band, None]))

    def source_rows(self, start: int, stop: int) -> tuple[int, int]:
        """(lo, hi): output rows start..stop-1 mix source rows lo..hi-1."""
        return int(self.y0[start]), int(self.y1[stop - 1]) + 1

    def at(self, p: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(K, h, w), (H, W) class ids in 0..K-1 -> (H, W): p[label] upsampled, at each pixel."""
        h, w = self.src
        flat = p.reshape(-1)
        base = labels * (h * w)
        if self._offsets is None:  # flat source offsets of the four neighbours, per output pixel
            top, bottom = (self.y0 * w)[:, None], (self.y1 * w)[:, None]
            self._offsets = (top + self.x0, top + self.x1, bottom + self.x0, bottom + self.x1)
        tl, tr, bl, br = (flat[base + o] for o in self._offsets)
        upper = tl * self.wx0 + tr * self.wx1  # the same operations, in the same order, as `full`
        lower = bl * self.wx0 + br * self.wx1
        return upper * self.wy0[:, None] + lower * self.wy1[:, None]


@lru_cache(maxsize=32)
def upsampler(src: tuple[int, int], dst: tuple[int, int]) -> Upsampler:
    """Shared per size pair: data sets have few image sizes, and the neighbour offsets are worth keeping."""
    return Upsampler(src, dst)


BAND_ROWS = 32  # output rows per band: a few source rows, whose candidate classes are fewer than the image's


def bands(probs: torch.Tensor, size: tuple[int, int], q: torch.Tensor | None = None, second: bool = False,
          band_elements: int = 1 << 23):
    """Yield (start, stop, keep, probabilities of the ``keep`` classes at output rows start..stop-1) of (K, h, w)
    upsampled to ``size``. Each band upsamples only the source rows it uses and, of them, only the classes that
    can matter there (`Candidates` at thresholds ``q``, with ``second``); bands hold at most ``band_elements``
    class scores, so memory stays bounded for many classes and big images. The values are those of
    `Upsampler.full`, bit for bit."""
    height, width = size
    up = upsampler(tuple(probs.shape[1:]), (height, width))
    step = max(1, min(BAND_ROWS, band_elements // (probs.shape[0] * width)))
    matter = Candidates(probs, q, second)
    for start in range(0, height, step):
        stop = min(height, start + step)
        lo, hi = up.source_rows(start, stop)
        keep = matter.rows(lo, hi)
        yield start, stop, keep, up.rows(up.columns(probs[keep, lo:hi]), start, stop, lo)


MARGIN = 1e-5  # well above float32 rounding of a bilinear sum, so a class that can matter is never left out
# The masks' second-highest probability (for `inspect`'s singleton curve) is kept from 2^-7 (0.8%) up and given as
# 0 below: tracking every class that reaches a few thousandths somewhere costs stage 1 a sixth more time at K=150
SECOND_FLOOR = 2.0 ** -7


class Candidates:
    """Which classes of (K, h, w) probabilities can matter once they are upsampled, per band of source rows:
    those that can enter a prediction set at thresholds ``q`` ((K,) or rows of them), those that can be the
    most probable class somewhere and, with ``second``, those that can be the second most probable at a value of
    at least SECOND_FLOOR. Every other class stays out of every set and below the
    best class at every pixel, so leaving it out changes no set, label or argmax; with 150 classes most are such.

    Bilinear upsampling gives each output pixel a convex mix of one 2x2 cell of source pixels. There a class
    never exceeds its largest value in the cell, and the best class holds at least the larger of two bounds:
    m = max over classes of their smallest value in the cell, and min over corners of (the summed probability
    of the n distinct classes that top some corner) / n (the best of those n holds at least their mean). A class
    can be the best in a cell only if it reaches that bound there, and the second only if it reaches the second
    largest of the classes' smallest values there."""

    def __init__(self, probs: torch.Tensor, q: torch.Tensor | None = None, second: bool = False):
        self.num_classes = num_classes = probs.shape[0]
        if probs.shape[1] == 1 or probs.shape[2] == 1:  # one row or column: its cells are the pixels themselves
            probs = probs.repeat(1, 2 if probs.shape[1] == 1 else 1, 2 if probs.shape[2] == 1 else 1)
        peak = probs.amax((1, 2))
        # Every pixel's most probable class holds at least (its total) / K: the bounds below need only the
        # classes reaching that somewhere (fewer classes give smaller bounds, which stay bounds)
        strong = (peak >= float(probs.sum(0).min()) / num_classes * (1 - MARGIN) - MARGIN).nonzero().flatten()
        low = _cells(probs[strong], torch.minimum)
        top = strong[probs[strong].max(0, keepdim=True).indices]  # max(dim): far faster than argmax over dim 0
        tops = (top[:, :-1, :-1], top[:, :-1, 1:], top[:, 1:, :-1], top[:, 1:, 1:])  # the class topping each corner
        distinct = [torch.ones_like(tops[0], dtype=torch.bool)]
        for a in range(1, 4):
            distinct.append(torch.stack([tops[a] != tops[b] for b in range(a)]).all(0))
        count = torch.stack(distinct).sum(0)
        corners = (probs[:, :-1, :-1], probs[:, :-1, 1:], probs[:, 1:, :-1], probs[:, 1:, 1:])
        held = torch.stack([sum(corner.gather(0, t) * d for t, d in zip(tops, distinct)) for corner in corners])
        best = low.amax(0)
        floor = torch.maximum(best, held.amin(0)[0] / count[0])
        if second:  # the second largest smallest value: the second most probable class holds at least that
            ties = (low == best).sum(0) >= 2
            runner_up = torch.where(ties, best, low.masked_fill_(low == best, 0).amax(0))
            floor = torch.minimum(floor, runner_up.clamp_min(SECOND_FLOOR))
        self.floor = floor * (1 - MARGIN) - MARGIN
        self.q = q.reshape(-1, num_classes).amax(0) + MARGIN if q is not None and q.numel() else None
        # only classes that pass somewhere need their cell maxima
        pool = peak >= float(self.floor.min())
        if self.q is not None:
            pool |= nonconformity(peak) <= self.q
        self.pool = pool.nonzero().flatten()
        self.high = _cells(probs[self.pool], torch.maximum)

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        """The classes (ascending ids) that can matter where output pixels mix source rows lo..hi-1."""
        last = self.floor.shape[0] - 1
        first = min(lo, last)
        band = slice(first, max(first, min(hi - 2, last)) + 1)  # the cells those pixels fall in
        high = self.high[:, band].flatten(1)
        keep = (high >= self.floor[band].flatten()).any(1)
        if self.q is not None:
            keep |= nonconformity(high.amax(1)) <= self.q[self.pool]
        return self.pool[keep]


def _cells(probs: torch.Tensor, pick) -> torch.Tensor:
    """(K, h-1, w-1): ``pick`` (torch.maximum or torch.minimum) over each 2x2 cell of source pixels."""
    out = pick(probs[:, :-1, :-1], probs[:, :-1, 1:])
    pick(out, probs[:, 1:, :-1], out=out)
    return pick(out, probs[:, 1:, 1:], out=out)


def lift(label: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Labels computed on the ``keep`` classes (255 = ignore) as class ids of the whole vocabulary."""
    ids = keep[label.long().clamp_max(len(keep) - 1)]
    return torch.where(label == IGNORE, IGNORE, ids).to(torch.uint8)


def position(keep: torch.Tensor, cls: int | None) -> int | None:
    """Where class ``cls`` sits among the ``keep`` classes (None: not there, or no such class)."""
    if cls is None:
        return None
    where = (keep == cls).nonzero()
    return int(where[0]) if len(where) else None


def _axis(n_in: int, n_out: int):
    scale = n_in / n_out
    src = ((torch.arange(n_out, dtype=torch.float32) + 0.5) * scale - 0.5).clamp_min(0)
    i0 = src.long().clamp_max(n_in - 1)
    i1 = (i0 + 1).clamp_max(n_in - 1)
    w1 = src - i0
    return i0, i1, 1 - w1, w1


class ScoreHistogram:
    """Everything any mode needs from the calibration set, in fixed memory.

    ``counts[f, y, b]``: pixels of true class y whose rounded score falls in bin b, for images of fold f.
    ``mass[f, y, b]``: the same counts divided by each image's number of valid pixels, summed over
    images (the per-image miscoverage that CRC and image-level coverage need).
    """

    def __init__(self, num_classes: int, folds: int = 1):
        self.num_classes, self.folds = num_classes, folds
        self.counts = torch.zeros(folds, num_classes, GRID, dtype=torch.int64)
        self.mass = torch.zeros(folds, num_classes, GRID, dtype=torch.float64)
        self.images = torch.zeros(folds, dtype=torch.int64)

    @classmethod
    def from_arrays(cls, counts: np.ndarray, mass: np.ndarray, images: np.ndarray) -> "ScoreHistogram":
        """The histogram that `calibrate` saved (its ``counts``, ``mass`` and ``images`` arrays)."""
        hist = cls.__new__(cls)
        hist.folds, hist.num_classes = counts.shape[:2]
        hist.counts, hist.mass, hist.images = (torch.from_numpy(a) for a in (counts, mass, images))
        return hist

    def add(self, labels: torch.Tensor, bins: torch.Tensor, fold: int = 0) -> None:
        """One image: true class (255 = ignore, skipped) and score bin of each pixel, any equal shapes."""
        labels, bins = labels.reshape(-1), bins.reshape(-1)
        spill = self.num_classes * GRID  # ignored pixels are counted here and dropped
        index = torch.where(labels == IGNORE, spill, labels * GRID + bins)
        counts = torch.bincount(index, minlength=spill + 1)[:spill].view(self.num_classes, GRID)
        valid = int(counts.sum())
        if valid == 0:
            return  # an image with no valid pixel carries no information (and no loss)
        self.counts[fold] += counts
        self.mass[fold] += counts / valid
        self.images[fold] += 1

    def merge(self, other: "ScoreHistogram") -> "ScoreHistogram":
        self.counts += other.counts
        self.mass += other.mass
        self.images += other.images
        return self

    def select(self, folds) -> "ScoreHistogram":
        """The histogram of a subset of folds, as a single fold."""
        out = ScoreHistogram(self.num_classes, 1)
        out.counts[0] = self.counts[folds].sum(0)
        out.mass[0] = self.mass[folds].sum(0)
        out.images[0] = self.images[folds].sum()
        return out

    def total(self) -> "ScoreHistogram":
        return self.select(list(range(self.folds)))


@dataclass
class Thresholds:
    """A fitted calibration: per-class score thresholds q (class k is in the set when 1 - p_k <= q_k)."""

    mode: str
    alpha: float
    q: torch.Tensor  # float32 (K,)
    rank: int | None = None  # k of the pooled quantile (paper); None for crc
    n: int = 0  # calibration units: pixels (paper, mondrian) or images (crc)
    per_class_rank: list = field(default_factory=list)  # (k_y, n_y) per class, mondrian
    fallbacks: list = field(default_factory=list)  # classes given the pooled threshold, mondrian
    pooled: float | None = None  # the pooled threshold those fallbacks use, mondrian


def kth_smallest(counts: torch.Tensor, k: int) -> float:
    """The k-th smallest value (1-based) of the scores a 1-D grid histogram counts."""
    index = int(torch.searchsorted(counts.cumsum(0), torch.tensor([k])).item())
    return float(grid_values()[index])


def pooled_quantile(counts: torch.Tensor, alpha: float, what: str) -> tuple[float, int, int]:
    """(qhat, k, n) of split conformal prediction over all the scores a (GRID,) histogram counts."""
    n = int(counts.sum())
    require_finite(n, alpha, f"{what} has {n} calibration scores", ", otherwise every class enters every set")
    k = conformal_rank(n, alpha)
    return kth_smallest(counts, k), k, n


def fit(hist: ScoreHistogram, alpha: float, mode: str) -> Thresholds:
    """Fit thresholds on a single-fold histogram (use ``hist.total()`` for all the data)."""
    check_alpha(alpha)
    counts = hist.counts[0]
    num_classes = counts.shape[0]
    if mode == "paper":
        q, k, n = pooled_quantile(counts.sum(0), alpha, "the labeled set")
        return Thresholds(mode, alpha, torch.full((num_classes,), q), rank=k, n=n)
    if mode == "mondrian":
        pooled, k, n = pooled_quantile(counts.sum(0), alpha, "the labeled set")
        q = torch.full((num_classes,), pooled)
        ranks, fallbacks = [], []
        for y in range(num_classes):
            n_y = int(counts[y].sum())
            k_y = conformal_rank(n_y, alpha)
            ranks.append((k_y, n_y))
            if k_y > n_y:  # too few pixels of class y for a finite quantile: use the pooled one
                fallbacks.append(y)
            else:
                q[y] = kth_smallest(counts[y], k_y)
        return Thresholds(mode, alpha, q, rank=k, n=n, per_class_rank=ranks, fallbacks=fallbacks, pooled=pooled)
    if mode == "crc":
        q, n = crc_threshold(hist.mass[0].sum(0), int(hist.images[0]), alpha)
        return Thresholds(mode, alpha, torch.full((num_classes,), q), n=n)
    raise UserError(f"--mode {mode}: choose one of {', '.join(MODES)}")


def crc_threshold(mass: torch.Tensor, n: int, alpha: float) -> tuple[float, int]:
    """Conformal risk control with loss = an image's fraction of valid pixels outside their set (bound B=1).

    ``mass[b]`` = sum over the n images of (their pixels with score bin b) / (their valid pixels). At
    threshold grid[b] the summed loss is miss(b) = sum of mass above b, so the empirical risk is
    miss(b) / n. Returns the smallest grid value with n/(n+1) R + 1/(n+1) <= alpha, i.e.
    miss(b) + 1 <= alpha (n+1). miss is summed from the top, so a loss of zero is exactly zero: only a risk
    within float64 rounding (~1e-13) of the bound could tip either way.
    """
    require_crc_images(n, alpha)
    budget = float(Fraction(str(alpha)) * (n + 1))
    tail = mass.flip(0).cumsum(0).flip(0)  # tail[b] = mass at b and above
    miss = torch.cat([tail[1:], torch.zeros(1, dtype=tail.dtype)])
    index = int(torch.nonzero(miss + 1 <= budget)[0].item())  # the last bin always qualifies (miss = 0)
    return float(grid_values()[index]), n


def require_crc_images(n: int, alpha: float) -> None:
    require_finite(n, alpha, f"crc mode has {n} labeled images with valid pixels", "")


def prediction_sets(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """bool (K, H, W): class k is in a pixel's set when 1 - p_k <= q_k (`nonconformity`'s clamp to [0, 1] cannot
    change that comparison with a q in [0, 1], so it is left out: one pass fewer over the scores)."""
    return torch.rsub(p, 1) <= q.view(-1, *([1] * (p.dim() - 1)))


def pseudo_label(p: torch.Tensor, sets: torch.Tensor, rule: str, background: int | None, best=None,
                 sizes=None) -> torch.Tensor:
    """uint8 (H, W) label from probabilities (K, H, W) and prediction sets; 255 where the rule keeps nothing.

    ``paper``: empty set -> 255; otherwise the most probable class of the set that is not background,
    and background only when it is alone in the set. ``singleton``: only one-class sets are kept.
    ``argmax``: the sets are ignored, every pixel keeps the most probable class (unfiltered masks).
    ``best``, ``sizes``: ``p.max(0)`` and ``set_sizes(sets)`` when the caller has them.
    """
    best = p.max(0) if best is None else best  # max(dim) rather than argmax: far faster over the leading dim
    if rule == "argmax":
        return best.indices.to(torch.uint8)
    sizes = set_sizes(sets) if sizes is None else sizes
    # where the most probable class is a member (not background, for the paper rule) the rule's label is that
    # class; the search over the members runs only if some pixel needs it (with one threshold for every class:
    # never, as the most probable class enters first)
    own = sets.gather(0, best.indices[None])[0]
    if rule == "singleton":
        keep, decided = sizes == 1, own
    elif rule == "paper":
        keep = sizes > 0
        decided = own if background is None else own & (best.indices != background)
    else:
        raise UserError(f"--rule {rule}: choose one of {', '.join(RULES)}")
    label = best.indices
    if not decided[keep].all():
        if rule == "singleton":
            members = sets.to(torch.uint8).max(0).indices  # the first (here: only) member
        else:
            ranked = torch.where(sets, p, torch.tensor(-1.0))  # probabilities are >= 0 > -1
            if background is not None:  # below every other member, above every non-member
                ranked[background] = torch.where(sets[background], torch.tensor(-0.5), torch.tensor(-1.0))
            members = ranked.max(0).indices
        label = torch.where(decided, label, members)
    return torch.where(keep, label, torch.tensor(IGNORE)).to(torch.uint8)


def set_sizes(sets: torch.Tensor) -> torch.Tensor:
    """Members per pixel of (K, ...) sets."""
    return sets.sum(0, dtype=torch.uint8 if sets.shape[0] < 256 else torch.int16)


def background_index(classes) -> int | None:
    """The class named 'background' (VOC, toy world), if any: ADE20K has none."""
    names = [c.lower() for c in classes]
    return names.index("background") if "background" in names else None
