"""Conformal math: exact quantiles against brute force, CRC against a search, coverage, sets and label rules."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.stage1.conformal import (GRID, ScoreHistogram, Upsampler, fit, grid_values, prediction_sets, pseudo_label,
                                to_bins)
from pipeline.errors import UserError

VALUES = grid_values()


def ref_rank(n: int, alpha: str) -> int:
    """k = ceil((n+1)(1-alpha)) in integers: alpha = a/b exactly."""
    a = Fraction(alpha)
    num, den = (n + 1) * (a.denominator - a.numerator), a.denominator
    return -(-num // den)


def histogram(labels, scores, num_classes, images=None) -> ScoreHistogram:
    hist = ScoreHistogram(num_classes)
    if images is None:
        hist.add(torch.as_tensor(labels), to_bins(torch.as_tensor(scores)))
    else:
        for lab, sc in images:
            hist.add(torch.as_tensor(lab), to_bins(torch.as_tensor(sc)))
    return hist


def random_scores(rng, n, kind):
    if kind == "uniform":
        return rng.random(n, dtype=np.float32)
    if kind == "ties":  # few distinct values, exact 0 and 1 included
        return rng.choice(np.array([0, 0.25, 0.5, 0.75, 1], np.float32), n)
    return rng.beta(0.3, 3, n).astype(np.float32)  # most mass near 0, like confident pixels


@given(st.floats(0, 1, width=32))
def test_rounding_goes_up_to_the_nearest_grid_value(x):
    s = torch.tensor([x], dtype=torch.float32)
    b = int(to_bins(s))
    assert 0 <= b < GRID
    assert VALUES[b] >= s[0]
    assert b == 0 or VALUES[b - 1] < s[0]  # the smallest grid value that is not below it


@pytest.mark.parametrize("kind", ["uniform", "ties", "skewed"])
def test_pooled_quantile_equals_kth_smallest(kind):
    rng = np.random.default_rng(hash(kind) % 2**32)
    for n in (1, 2, 9, 10, 19, 20, 99, 100, 101, 1000, 4321):
        for alpha in ("0.5", "0.2", "0.1", "0.05", "0.01", "0.3333", "0.001"):
            scores = random_scores(rng, n, kind)
            k = ref_rank(n, alpha)
            hist = histogram(np.zeros(n, np.int64), scores, 1)
            if k > n:
                with pytest.raises(UserError, match="alpha"):
                    fit(hist, float(alpha), "paper")
                continue
            rounded = VALUES[to_bins(torch.from_numpy(scores))]
            expected = torch.kthvalue(rounded, k).values.item()
            th = fit(hist, float(alpha), "paper")
            assert th.q[0].item() == expected, (n, alpha)
            assert (th.rank, th.n) == (k, n)
            if kind == "uniform":  # unrounded scores: the threshold is the k-th score rounded up
                exact = torch.kthvalue(torch.from_numpy(scores), k).values
                assert th.q[0] >= exact and VALUES[to_bins(exact[None])][0] == th.q[0]


def test_alpha_exactly_one_over_n_plus_one_is_the_largest_score():
    scores = np.linspace(0.1, 0.9, 9, dtype=np.float32)
    th = fit(histogram(np.zeros(9, np.int64), scores, 1), 0.1, "paper")  # k = ceil(10 * 0.9) = 9 = n
    assert th.rank == 9 and th.q[0] == VALUES[to_bins(torch.tensor([0.9]))][0]
    with pytest.raises(UserError, match="at least 9"):
        fit(histogram(np.zeros(8, np.int64), scores[:8], 1), 0.1, "paper")


def test_mondrian_thresholds_per_class_with_pooled_fallback():
    rng = np.random.default_rng(1)
    sizes = [3000, 500, 9, 8, 0]  # at alpha 0.1 a class needs 9 pixels for a finite threshold
    labels = np.concatenate([np.full(n, y) for y, n in enumerate(sizes)])
    scores = np.concatenate([rng.beta(1 + y, 4, n).astype(np.float32) for y, n in enumerate(sizes)])
    th = fit(histogram(labels, scores, len(sizes)), 0.1, "mondrian")
    rounded = VALUES[to_bins(torch.from_numpy(scores))]
    pooled = torch.kthvalue(rounded, ref_rank(len(scores), "0.1")).values
    for y, n in enumerate(sizes):
        k = ref_rank(n, "0.1")
        if k <= n:
            assert th.q[y] == torch.kthvalue(rounded[labels == y], k).values, y
        else:
            assert th.q[y] == pooled and y in th.fallbacks
    assert th.fallbacks == [3, 4]
    assert th.per_class_rank[2] == (9, 9)


def brute_force_crc(images, alpha: str) -> float:
    """Smallest candidate t (0 or a score) with n/(n+1) R(t) + 1/(n+1) <= alpha, decided in exact fractions.

    Every candidate is evaluated in float64 first; exact arithmetic settles the ones that come close.
    """
    rounded = [VALUES[to_bins(torch.as_tensor(s))].numpy().astype(np.float64) for _, s in images]
    n = len(rounded)
    candidates = np.unique(np.concatenate([[0.0], *rounded]))
    risk = sum((r[None, :] > candidates[:, None]).mean(1) for r in rounded) / n
    near = n / (n + 1) * risk + 1 / (n + 1) <= float(Fraction(alpha)) + 1e-9
    for t in candidates[near]:
        exact = sum(Fraction(int((r > t).sum()), len(r)) for r in rounded) / n
        if Fraction(n, n + 1) * exact + Fraction(1, n + 1) <= Fraction(alpha):
            return float(t)
    return 1.0


@pytest.mark.parametrize("seed", range(6))
def test_crc_threshold_equals_brute_force_search(seed):
    rng = np.random.default_rng(seed)
    for n, alpha in ((9, "0.1"), (19, "0.1"), (30, "0.05"), (12, "0.2"), (40, "0.3")):
        images = []
        for _ in range(n):
            m = int(rng.integers(50, 400))
            images.append((np.zeros(m, np.int64), rng.beta(0.5, 2 + rng.random() * 4, m).astype(np.float32)))
        th = fit(histogram(None, None, 1, images), float(alpha), "crc")
        assert th.q[0].item() == brute_force_crc(images, alpha), (seed, n, alpha)
        assert th.n == n
    with pytest.raises(UserError, match="at least 19"):
        fit(histogram(None, None, 1, images[:18]), 0.05, "crc")


def test_split_conformal_coverage_matches_k_over_n_plus_one():
    """Exchangeable scores (distinct values, no ties): mean test coverage ~ k/(n+1) over many random splits."""
    rng = np.random.default_rng(0)
    pool = torch.from_numpy(rng.choice(GRID, 600, replace=False))  # distinct grid values
    scores = VALUES[pool]
    n, alpha, reps = 150, 0.1, 400
    k = ref_rank(n, "0.1")
    coverage = []
    for _ in range(reps):
        perm = torch.from_numpy(rng.permutation(len(scores)))
        cal, test = scores[perm[:n]], scores[perm[n:]]
        q = fit(histogram(np.zeros(n, np.int64), cal, 1), alpha, "paper").q[0]
        coverage.append((test <= q).float().mean().item())
    coverage = np.array(coverage)
    se = coverage.std(ddof=1) / math.sqrt(reps)
    assert abs(coverage.mean() - k / (n + 1)) < 4 * se, (coverage.mean(), k / (n + 1), se)


def test_mondrian_coverage_per_class():
    rng = np.random.default_rng(1)
    sizes = {0: 400, 1: 120, 2: 60}
    pools = {y: VALUES[torch.from_numpy(rng.choice(GRID, m, replace=False))] for y, m in sizes.items()}
    n_cal = {0: 200, 1: 60, 2: 29}
    reps, alpha = 400, 0.1
    cover = {y: [] for y in sizes}
    for _ in range(reps):
        labels, cal, tests = [], [], {}
        for y, pool in pools.items():
            perm = torch.from_numpy(rng.permutation(len(pool)))
            cal.append(pool[perm[: n_cal[y]]])
            labels.append(torch.full((n_cal[y],), y))
            tests[y] = pool[perm[n_cal[y]:]]
        th = fit(histogram(torch.cat(labels), torch.cat(cal), len(sizes)), alpha, "mondrian")
        for y in sizes:
            cover[y].append((tests[y] <= th.q[y]).float().mean().item())
    for y in sizes:
        c = np.array(cover[y])
        target = ref_rank(n_cal[y], "0.1") / (n_cal[y] + 1)
        assert abs(c.mean() - target) < 4 * c.std(ddof=1) / math.sqrt(reps), (y, c.mean(), target)


def test_crc_controls_expected_miscoverage_per_image():
    """Images as the exchangeable unit: the mean held-out image miscoverage stays <= alpha."""
    rng = np.random.default_rng(2)
    images = []
    for _ in range(120):  # images differ in difficulty: pixels of one image are dependent
        m = int(rng.integers(40, 200))
        images.append((np.zeros(m, np.int64), rng.beta(0.4, 1 + 6 * rng.random(), m).astype(np.float32)))
    n, alpha, reps = 40, 0.1, 200
    losses = []
    for _ in range(reps):
        perm = rng.permutation(len(images))
        q = fit(histogram(None, None, 1, [images[i] for i in perm[:n]]), alpha, "crc").q[0].item()
        losses += [float((VALUES[to_bins(torch.from_numpy(images[i][1]))] > q).float().mean()) for i in perm[n:]]
    losses = np.array(losses)
    assert losses.mean() <= alpha + 3 * losses.std(ddof=1) / math.sqrt(reps)
    assert losses.mean() > alpha - 2 / (n + 1) - 0.02  # and not trivially conservative


@pytest.mark.parametrize("src,dst", [((94, 125), (375, 500)), ((32, 32), (128, 128)), ((7, 5), (7, 5)),
                                     ((10, 3), (4, 11)), ((1, 1), (3, 4))])
def test_upsampler_per_pixel_equals_full_resize_bit_for_bit(src, dst):
    torch.manual_seed(0)
    p = torch.rand(5, *src)
    up = Upsampler(src, dst)
    labels = torch.randint(0, 5, dst)
    full = up.full(p.clone())
    assert torch.equal(up.at(p, labels), full.gather(0, labels[None])[0])
    ref = F.interpolate(p[None], size=dst, mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(full, ref, atol=1e-5, rtol=0)


def probs(*columns):
    """(K, 1, N) probabilities from per-pixel class distributions."""
    return torch.tensor(columns, dtype=torch.float32).T[:, None, :]


def test_paper_rule_on_hand_built_sets():
    # K = 4, class 0 = background; threshold q = 0.7: class in the set when p >= 0.3
    p = probs([0.25, 0.25, 0.25, 0.25],  # empty set -> ignore
              [0.9, 0.05, 0.05, 0.0],    # {bg} -> bg
              [0.6, 0.0, 0.4, 0.0],      # {bg, 2}: background de-prioritised -> 2
              [0.1, 0.35, 0.0, 0.55],    # {1, 3} -> most probable, 3
              [0.0, 0.0, 0.0, 1.0])      # {3} -> 3
    q = torch.full((4,), 0.7)
    sets = prediction_sets(p, q)
    assert sets[:, 0].tolist() == [[False, True, True, False, False], [False, False, False, True, False],
                                   [False, False, True, False, False], [False, False, False, True, True]]
    assert pseudo_label(p, sets, "paper", background=0)[0].tolist() == [255, 0, 2, 3, 3]
    assert pseudo_label(p, sets, "singleton", background=0)[0].tolist() == [255, 0, 255, 255, 3]
    assert pseudo_label(p, sets, "argmax", background=0)[0].tolist() == [0, 0, 0, 3, 3]  # sets ignored
    # without a background class (ADE20K) a multi-class set gives its most probable member
    assert pseudo_label(p, sets, "paper", background=None)[0].tolist() == [255, 0, 0, 3, 3]


def test_per_class_thresholds_build_the_sets():
    p = probs([0.5, 0.5, 0.0], [0.2, 0.8, 0.0])
    q = torch.tensor([0.4, 0.1, 0.5])  # bg needs p >= 0.6, class 1 p >= 0.9
    sets = prediction_sets(p, q)
    assert pseudo_label(p, sets, "paper", 0)[0].tolist() == [255, 255]
    q = torch.tensor([0.5, 0.3, 0.5])  # bg p >= 0.5, class 1 p >= 0.7
    assert pseudo_label(p, prediction_sets(p, q), "paper", 0)[0].tolist() == [0, 1]


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 6), st.integers(1, 40), st.floats(0, 1), st.sampled_from(["paper", "singleton", "argmax"]),
       st.integers(0, 2**31 - 1))
def test_labels_are_class_ids_or_ignore_and_come_from_the_set(k, pixels, q, rule, seed):
    gen = torch.Generator().manual_seed(seed)
    p = torch.rand(k, 1, pixels, generator=gen).softmax(0)
    sets = prediction_sets(p, torch.full((k,), q))
    label = pseudo_label(p, sets, rule, background=0)
    assert label.dtype == torch.uint8
    kept = label != 255
    assert ((label < k) | ~kept).all()
    if rule == "argmax":
        assert kept.all() and (label.long() == p.argmax(0)).all()
        return
    assert sets.gather(0, label.long().clamp_max(k - 1)[None])[0][kept].all()  # the label is in its set
    assert (kept == (sets.sum(0) > 0 if rule == "paper" else sets.sum(0) == 1)).all()
