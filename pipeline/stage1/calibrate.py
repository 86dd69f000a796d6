"""Stage 1: fit conformal thresholds on the labeled set, write filtered masks of the unlabeled set.

Reads ``<work>/logits.zarr`` (stage 0) and the data set's masks; writes

    <work>/calibration.json   settings, thresholds, counts, diagnostics, the inputs' checksums
    <work>/masks/<id>.png     one palette PNG per unlabeled image, class ids and 255 = ignore

Masks are written into ``<work>/.masks-<key>/`` (a killed run resumes there: each PNG is written
atomically, so one that exists is complete) and moved to ``<work>/masks`` only when all are there;
``masks/.key`` then names the calibration they belong to. ``calibration.json`` is removed before that
move and rewritten after it, so a reader never pairs masks with the thresholds of another run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from functools import reduce
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline import __version__
from pipeline.atomic import atomic_write, ensure_writable, write_text_atomic
from pipeline.locks import locked
from pipeline.stage1.conformal import (GRID, MODES, RULES, SECOND_FLOOR, ScoreHistogram, Thresholds, background_index,
                                       bands, check_alpha, fit, lift, nonconformity, position, prediction_sets,
                                       pseudo_label, require_crc_images, set_sizes, to_bins, upsampler)
from pipeline.config import Config
from pipeline.data.datasets import Dataset, Sample
from pipeline.errors import UserError
from pipeline.stage1.held_out import HeldOut, held_out
from pipeline.labels import IGNORE, write_palette_png
from pipeline.metrics import confusion, iou_per_class
from pipeline.parallel import in_threads
from pipeline.stage0.store import LogitsStore
from pipeline.stage1.record import (CALIBRATION, HISTOGRAMS, KEY_FILE, MASKS, SUMS_FILE, damaged_masks, file_crc,
                             read_calibration)
from pipeline.ui import no_progress



@dataclass(frozen=True)
class Settings:
    alpha: float = 0.1
    mode: str = "paper"
    rule: str = "paper"
    folds: int = 5  # cross-calibration folds of the diagnostics
    seed: int = 0  # assignment of labeled images to folds

    def check(self) -> None:
        check_alpha(self.alpha)
        if self.mode not in MODES:
            raise UserError(f"--mode {self.mode}: choose one of {', '.join(MODES)}")
        if self.rule not in RULES:
            raise UserError(f"--rule {self.rule}: choose one of {', '.join(RULES)}")
        if self.folds < 2:
            raise UserError(f"--folds {self.folds}: cross-calibration needs at least 2 folds")


def _locks(write_masks, **_):
    """calibrate reads the store and writes calibration.json and masks/ (with --no-masks: only reads them)."""
    return (["masks"], ["scores"]) if write_masks else ([], ["scores", "masks"])


@locked("calibrate", _locks)
def run_calibrate(config: Config, settings: Settings, write_masks: bool = True, jobs: int | None = None,
                  progress=None, warn=print) -> dict:
    """Fit, write the masks, calibration.json and its histograms; returns the calibration record. With
    ``write_masks`` False: fit and report only, nothing written (an existing record and its masks stay).

    ``progress(description)`` is a context manager yielding ``update(advance, total)`` (see `pipeline.ui`).
    Does nothing and returns the existing record when ``calibration.json`` already holds this fit of the
    same inputs (and its masks, when asked for).
    """
    settings.check()
    jobs = jobs or os.cpu_count() or 1
    dataset = Dataset(config)
    store = LogitsStore(config.work_dir / "logits.zarr")
    if store.classes != dataset.classes:
        raise UserError(f"{store.path}: scores are for classes {list(store.classes)[:5]}... but the data set has "
                        f"{list(dataset.classes)[:5]}...; rerun `conformalsam logits --force`")
    if overlap := dataset.overlap():
        warn(overlap)
    labeled = _scored(store, dataset, "labeled", warn)
    if settings.folds > len(labeled):  # assign_folds caps them: say so rather than report folds that are not
        warn(f"--folds {settings.folds}: {len(labeled)} labeled images make at most {len(labeled)} folds; the "
             f"cross-calibration diagnostics are leave-one-out ({len(labeled)} folds)")
    if settings.mode == "crc":  # fail before the long pass
        require_crc_images(len(labeled), settings.alpha)
    checksum = store_checksum(store, [s.id for s in labeled])
    key = fit_key(settings, dataset, checksum, labeled)
    unlabeled = _scored(store, dataset, "unlabeled", warn) if write_masks else []
    masks_key = mask_key(key, store, unlabeled) if write_masks else None
    work = config.work_dir
    if write_masks:  # a killed run's staging folder goes even when this run has nothing to write
        _clean_staging(work, _staging(work, masks_key))
    previous = read_calibration(work)
    if previous and previous.get("key") == key and (work / HISTOGRAMS).is_file() and (not write_masks or (
            (previous.get("masks") or {}).get("key") == masks_key and _masks_current(work, masks_key, len(unlabeled)))):
        repaired = _repair_masks(store, dataset, unlabeled, previous, work) if write_masks else []
        _warn_if_noop(previous, warn)
        return {**previous, "unchanged": not repaired, "repaired": repaired}

    if write_masks:  # before the long pass
        ensure_writable(work, "choose another --work-dir, or fix the folder's permissions")
    hist = accumulate(store, dataset, labeled, settings, jobs, progress)
    thresholds = fit(hist.total(), settings.alpha, settings.mode)
    record = _record(key, settings, store, checksum, dataset, hist, thresholds)
    held = held_out(store, dataset, labeled, assign_folds(labeled, settings), hist, settings.mode, settings.rule,
                    [settings.alpha], jobs, progress)
    record["diagnostics"] = {"cross_calibration": cross_calibrate(hist, settings, dataset.classes),
                             "held_out": held_out_report(held)}
    stats = None
    if write_masks:
        stats = write_all_masks(store, dataset, unlabeled, thresholds, settings.rule, work, masks_key, jobs,
                                progress)
        record["diagnostics"]["unlabeled"] = stats.report(dataset.classes)
        record["masks"] = {"dir": MASKS, "count": len(unlabeled), "key": masks_key}
    _warn_if_noop(record, warn)
    if not write_masks:  # fit and report only: calibration.json stays the record of the masks on disk
        return {**record, "unchanged": False, "saved": False}
    save_histograms(work / HISTOGRAMS, hist, stats, key)
    write_text_atomic(work / CALIBRATION, json.dumps(record, indent=1) + "\n")
    return {**record, "unchanged": False, "saved": True}


NOOP_KEPT = 0.99  # above this kept fraction the filter is said to remove almost nothing
WORSE_BY = 0.01  # ... unless its kept labels are this much less accurate than the raw argmax: then it relabels


def _warn_if_noop(record: dict, warn) -> None:
    """Say so when the masks keep almost every pixel, and why: the annotator's top-1 accuracy against 1 - alpha."""
    diagnostics = record.get("diagnostics") or {}
    held = diagnostics.get("held_out")  # absent from records of earlier versions
    if held is None or record["rule"] == "argmax":
        return
    kept, where = held["kept_fraction"], "of the labeled pixels, held out by fold"
    unlabeled = diagnostics.get("unlabeled")
    if unlabeled and unlabeled["kept_fraction"] is not None:  # the masks themselves, when written
        kept, where = unlabeled["kept_fraction"], "of the unlabeled pixels"
    if kept is None or kept <= NOOP_KEPT:
        return
    top1, target = held["top1_accuracy"], 1 - record["alpha"]
    accuracy = held.get("kept_accuracy")
    if accuracy is not None and accuracy < top1 - WORSE_BY:  # not the raw argmax: labels changed for the worse
        fix = "--rule singleton" if record["mode"] == "mondrian" else "a larger alpha, or --rule singleton"
        warn(f"alpha {record['alpha']:g} keeps {kept:.1%} {where}, but relabels them for the worse: held out, "
             f"{accuracy:.1%} of the kept labeled pixels are right, against the annotator's top-1 accuracy of "
             f"{top1:.1%}. The {record['mode']} sets hold so many classes that the paper rule's pick from them, "
             f"the most probable non-background class, replaces correct background. Use {fix} (a pixel is kept "
             "only where its set holds one class).")
        return
    why = (f"it is below 1 - alpha = {target:.0%}: to cover that share of the true classes the threshold must "
           "admit classes the annotator ranks second or lower, so nearly every set holds the most probable class"
           if top1 < target else
           f"it is at or above 1 - alpha = {target:.0%}: the most probable class alone already covers the target, "
           "and the annotator is confident nearly everywhere")
    warn(f"alpha {record['alpha']:g} keeps {kept:.1%} {where}: the filter removes almost nothing. The annotator's "
         f"top-1 accuracy on the labeled pixels is {top1:.1%}; {why}. A larger alpha filters more "
         "(`conformalsam inspect` sweeps alpha).")


def held_out_report(held: HeldOut) -> dict:
    """The record's figures of one alpha's held-out pseudo-labels (pipeline/stage1/held_out.py)."""
    return {"top1_accuracy": held.top1_accuracy,
            "kept_fraction": float(held.kept[0]) if held.alphas else None,
            "kept_accuracy": _num(held.accuracy[0]) if held.alphas else None}


def _scored(store: LogitsStore, dataset: Dataset, split: str, warn) -> list[Sample]:
    """The split's samples that have scores; images stage 0 could not read are skipped with a warning."""
    samples = list({s.id: s for s in dataset.split(split)}.values())
    failed = dict(store.attrs.get("failed", {}))
    have = set(store.ids())
    missing = [s.id for s in samples if s.id not in have and s.id not in failed]
    if missing:
        raise UserError(f"{store.path}: {len(missing)} {split} images have no scores (first: {missing[0]}); run "
                        f"`conformalsam logits --split {split}` with the same config")
    skipped = [s.id for s in samples if s.id in failed]
    if skipped:
        warn(f"{len(skipped)} {split} images were unreadable in stage 0 and are left out (first: {skipped[0]})")
    return [s for s in samples if s.id in have]


# ---------------------------------------------------------------- calibration pass (labeled images)

def accumulate(store: LogitsStore, dataset: Dataset, samples: list[Sample], settings: Settings, jobs: int,
               progress=None) -> ScoreHistogram:
    """Stream every labeled image once into per-fold, per-class score histograms."""
    if not samples:
        raise UserError(f"{dataset.split_path('labeled')}: no labeled images to calibrate on")
    fold_of = assign_folds(samples, settings)
    folds = max(fold_of.values()) + 1
    with (progress or no_progress)("labeled") as update:
        update(0, len(samples))
        parts = in_threads(lambda share: _accumulate_share(store, dataset, share, folds, fold_of, update),
                          samples, jobs)
    return reduce(lambda a, b: a.merge(b), parts)


def assign_folds(samples: list[Sample], settings: Settings) -> dict[str, int]:
    """Image id -> cross-calibration fold: a seeded shuffle dealt round-robin, so fold sizes differ by one."""
    folds = min(settings.folds, len(samples))
    order = np.random.default_rng(settings.seed).permutation(len(samples))
    return {samples[i].id: int(rank % folds) for rank, i in enumerate(order)}


def _accumulate_share(store, dataset, share, folds, fold_of, update) -> ScoreHistogram:
    hist = ScoreHistogram(dataset.num_classes, folds)
    for sample in share:
        labels, bins = image_scores(store, dataset, sample)
        hist.add(labels, bins, fold_of[sample.id])
        update(1)
    return hist


def image_scores(store: LogitsStore, dataset: Dataset, sample: Sample) -> tuple[torch.Tensor, torch.Tensor]:
    """(true class, score bin) of each pixel of a labeled image at the mask's resolution; class 255 = ignore."""
    probs = store.probabilities(sample.id)
    mask = torch.from_numpy(dataset.read_mask(sample.mask, store.image_size(sample.id))).long()
    p_true = upsampler(tuple(probs.shape[1:]), tuple(mask.shape)).at(probs, mask.masked_fill(mask == IGNORE, 0))
    return mask, to_bins(nonconformity(p_true))


# ---------------------------------------------------------------- diagnostics on the labeled set

def held_out_coverage(hist: ScoreHistogram, fold: int, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Covered and total pixels per class, and the summed per-image coverage, of one fold at thresholds q."""
    last = to_bins(q)  # q is on the grid: its own bin
    below = torch.arange(hist.counts.shape[-1])[None, :] <= last[:, None]
    covered = (hist.counts[fold] * below).sum(1)
    image_covered = float((hist.mass[fold] * below).sum())
    return covered, hist.counts[fold].sum(1), image_covered


def cross_calibrate(hist: ScoreHistogram, settings: Settings, classes) -> dict:
    """k-fold cross-calibration: fit on k-1 folds of labeled images, measure coverage on the held-out fold."""
    covered = torch.zeros(hist.num_classes, dtype=torch.int64)
    total = torch.zeros(hist.num_classes, dtype=torch.int64)
    image_covered, images, skipped = 0.0, 0, []
    for fold in range(hist.folds):
        rest = [f for f in range(hist.folds) if f != fold]
        try:
            q = fit(hist.select(rest), settings.alpha, settings.mode).q
        except UserError:  # too little data without this fold: no finite threshold to test
            skipped.append(fold)
            continue
        c, t, ic = held_out_coverage(hist, fold, q)
        covered += c
        total += t
        image_covered += ic
        images += int(hist.images[fold])
    per_class = {name: (float(c) / float(t) if t else None) for name, c, t in zip(classes, covered, total)}
    return {
        "folds": hist.folds,
        "folds_without_finite_threshold": skipped,
        "target": 1 - settings.alpha,
        "pixel_coverage": float(covered.sum()) / float(total.sum()) if total.sum() else None,
        "image_coverage": image_covered / images if images else None,
        "per_class": per_class,
    }


# ---------------------------------------------------------------- masks (unlabeled images)

def write_all_masks(store: LogitsStore, dataset: Dataset, samples: list[Sample], thresholds: Thresholds,
                    rule: str, work: Path, key: str, jobs: int, progress=None) -> "MaskStats":
    """Write every unlabeled image's filtered mask, then move the finished folder to ``<work>/masks``
    (`run_calibrate` has cleared other staging folders and killed writers' temporary files)."""
    staging = _staging(work, key)
    staging.mkdir(parents=True, exist_ok=True)
    num_classes = dataset.num_classes
    background = background_index(dataset.classes)
    with_truth = bool(samples) and all(s.mask is not None and s.mask.is_file() for s in samples)

    def work_on(share: list[Sample]) -> MaskStats:
        stats = MaskStats(num_classes, with_truth)
        for sample in share:
            label, raw, sizes, top2 = filtered_mask(store, sample.id, thresholds.q, rule, background,
                                                    second=rule == "singleton")
            out = staging / f"{sample.id}.png"
            if not out.exists():  # written by an interrupted run of this same calibration
                write_palette_png(out, label.numpy())
            truth = dataset.read_mask(sample.mask, tuple(label.shape)) if with_truth else None
            stats.add(raw, label, sizes, top2, truth)
            update(1)
        return stats

    with (progress or no_progress)("masks") as update:
        update(0, len(samples))
        parts = in_threads(work_on, samples, jobs) if samples else [MaskStats(num_classes, with_truth)]
    stats = reduce(lambda a, b: a.merge(b), parts)
    (staging / SUMS_FILE).write_text(json.dumps({s.id: file_crc(staging / f"{s.id}.png") for s in samples}) + "\n")
    (staging / KEY_FILE).write_text(key + "\n")
    _install(work, staging)
    return stats


def _repair_masks(store: LogitsStore, dataset: Dataset, samples: list[Sample], record: dict, work: Path) -> list[str]:
    """Rewrite the masks of the current set whose bytes no longer match the CRC-32 recorded when they were
    written (deleted, truncated, overwritten): the same computation, so the same bytes. Returns their ids."""
    damaged = damaged_masks(work / MASKS, [s.id for s in samples]) or []  # None: a set without sums
    q, background = thresholds_of(record), background_index(dataset.classes)
    for image_id in damaged:
        write_palette_png(work / MASKS / f"{image_id}.png", filtered_mask(store, image_id, q, record["rule"],
                                                                          background)[0].numpy())
    return damaged


def thresholds_of(record: dict) -> torch.Tensor:
    """The per-class thresholds q of a calibration record (one pooled value repeated, or one per class)."""
    qhat = record["qhat"]
    return torch.tensor([qhat[c] for c in record["classes"]] if isinstance(qhat, dict)
                        else [qhat] * len(record["classes"]), dtype=torch.float32)


def filtered_mask(store: LogitsStore, image_id: str, q: torch.Tensor, rule: str, background: int | None,
                  band_elements: int = 1 << 23, second: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(filtered label, raw argmax, set size, highest probability (1, H, W), with ``second`` also the second
    highest (2, H, W)) of one stored image at full resolution, each (H, W) but the last.

    Only the classes that can matter are upsampled (`bands`, `Candidates`): everything is as from all classes,
    except that a second-highest probability below SECOND_FLOOR (2^-7) is given as 0. Rows are processed in
    bands of at most ``band_elements`` class scores. ``second`` costs a tenth more time at 150 classes (more
    classes can matter).
    """
    height, width = store.image_size(image_id)
    label = torch.empty(height, width, dtype=torch.uint8)
    raw = torch.empty(height, width, dtype=torch.int64)
    sizes = torch.empty(height, width, dtype=torch.int16)
    top2 = torch.empty(2 if second else 1, height, width)
    for start, stop, keep, full in bands(store.probabilities(image_id), (height, width), q, second, band_elements):
        sets, best = prediction_sets(full, q[keep]), full.max(0)
        sizes[start:stop] = set_sizes(sets)
        label[start:stop] = lift(pseudo_label(full, sets, rule, position(keep, background), best, sizes[start:stop]),
                                 keep)
        raw[start:stop] = keep[best.indices]
        top2[0, start:stop] = best.values
        if second:
            runner_up = full.scatter_(0, best.indices[None], -1.0).amax(0)  # in place: the band's scores are done
            top2[1, start:stop] = runner_up.masked_fill_(runner_up < SECOND_FLOOR, 0)  # below it, left out
    return label, raw, sizes, top2


def _staging(work: Path, masks_key: str) -> Path:
    """Where the masks of this key are written before they replace masks/ (a killed run resumes there)."""
    return work / f".masks-{masks_key[:16]}"


def _clean_staging(work: Path, staging: Path) -> None:
    """Drop staging folders of other calibrations and temporary files of killed writers."""
    for old in work.glob(".masks-*"):
        if old != staging:
            shutil.rmtree(old, ignore_errors=True)
    if staging.is_dir():
        for tmp in staging.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)


def _install(work: Path, staging: Path) -> None:
    """Replace ``<work>/masks`` by the finished staging folder; calibration.json is rewritten after this."""
    (work / CALIBRATION).unlink(missing_ok=True)
    final = work / MASKS
    if final.exists():
        retired = work / f".masks-old-{os.getpid()}"
        os.replace(final, retired)
        os.replace(staging, final)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, final)


def _masks_current(work: Path, key: str, count: int) -> bool:
    """The masks folder holds the set of masks for this key: with checksums (`_repair_masks` mends damage),
    else complete by count."""
    try:
        if (work / MASKS / KEY_FILE).read_text().strip() != key:
            return False
    except OSError:
        return False
    return (work / MASKS / SUMS_FILE).is_file() or sum(1 for _ in (work / MASKS).glob("*.png")) == count


def save_histograms(path: Path, hist: ScoreHistogram, stats: "MaskStats | None", key: str) -> None:
    """Labeled per-fold, per-class score counts (and CRC mass); with masks, the unlabeled best scores, and the
    second best ones where the rule is singleton."""
    arrays = {"key": np.array(key), "counts": hist.counts.numpy(), "mass": hist.mass.numpy(),
              "images": hist.images.numpy()}
    if stats is not None:
        arrays.update(unlabeled_best=stats.best)
        if stats.second.any():
            arrays.update(unlabeled_second=stats.second)
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)


class MaskStats:
    """What the filtered masks did: raw -> filtered transitions, set sizes, and quality against ground truth."""

    def __init__(self, num_classes: int, with_truth: bool):
        k = num_classes
        self.k = k
        self.transitions = np.zeros((k, k + 1), np.int64)  # raw argmax class -> filtered label (k = ignore)
        self.set_sizes = np.zeros(k + 1, np.int64)
        self.raw = np.zeros((k, k), np.int64) if with_truth else None  # truth x raw argmax
        self.filtered = np.zeros((k, k + 1), np.int64) if with_truth else None  # truth x filtered (k = ignore)
        # scores 1 - p of each pixel's most and second most probable class: with one threshold q, a pixel's
        # set is non-empty iff best <= q and a singleton iff best <= q < second, so these two histograms
        # give the kept fraction at any alpha without another pass (`conformalsam inspect`); the second only
        # where the rule is singleton (all zero otherwise)
        self.best, self.second = np.zeros(GRID, np.int64), np.zeros(GRID, np.int64)
        self.images = 0

    def add(self, raw: torch.Tensor, label: torch.Tensor, sizes: torch.Tensor, top2: torch.Tensor,
            truth: np.ndarray | None) -> None:
        k = self.k
        self.best += np.bincount(to_bins(nonconformity(top2[0])).reshape(-1).numpy(), minlength=GRID)
        if len(top2) > 1:
            self.second += np.bincount(to_bins(nonconformity(top2[1])).reshape(-1).numpy(), minlength=GRID)
        filtered = torch.where(label == IGNORE, k, label.long())
        self.transitions += confusion(filtered, raw, k, k + 1)  # rows: the raw argmax class
        self.set_sizes += np.bincount(sizes.reshape(-1).numpy(), minlength=k + 1)
        if truth is not None:
            self.raw += confusion(raw, truth, k)
            self.filtered += confusion(filtered, truth, k, k + 1)
        self.images += 1

    def merge(self, other: "MaskStats") -> "MaskStats":
        for name in ("transitions", "set_sizes", "raw", "filtered", "best", "second"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name) + getattr(other, name))
        self.images += other.images
        return self

    def report(self, classes) -> dict:
        k = self.k
        pixels = self.transitions.sum()
        kept = pixels - self.transitions[:, k].sum()
        raw_count = self.transitions.sum(1)
        report = {
            "images": self.images,
            "pixels": int(pixels),
            "kept_fraction": _ratio(kept, pixels),
            "per_class": {name: {"raw_pixels": int(raw_count[c]),
                                 "kept_fraction": _ratio(raw_count[c] - self.transitions[c, k], raw_count[c]),
                                 "filtered_pixels": int(self.transitions[:, c].sum())}
                          for c, name in enumerate(classes)},
            "set_size_histogram": [int(v) for v in self.set_sizes],
        }
        if self.raw is not None:
            report["quality"] = quality(self.raw, self.filtered, classes)
        return report


def quality(raw: np.ndarray, filtered: np.ndarray, classes) -> dict:
    """Pseudo-label quality against ground truth: raw argmax; filtered on kept pixels; filtered with ignore = miss."""
    k = raw.shape[0]
    kept = filtered[:, :k]
    tp = np.diag(kept).astype(np.float64)
    # Overall: an ignored pixel counts as a miss of its true class (a false negative), never a false positive.
    overall_union = filtered.sum(1) + kept.sum(0) - tp

    raw_iou, kept_iou, overall_iou = iou_per_class(raw), iou_per_class(kept), _safe_div(tp, overall_union)
    return {
        "raw": {"miou": _nanmean(raw_iou), "pixel_accuracy": _ratio(np.trace(raw), raw.sum())},
        "filtered_kept": {"miou": _nanmean(kept_iou), "pixel_accuracy": _ratio(tp.sum(), kept.sum())},
        "filtered_overall": {"miou": _nanmean(overall_iou), "pixel_accuracy": _ratio(tp.sum(), filtered.sum())},
        "per_class_iou": {name: {"raw": _num(raw_iou[c]), "filtered_kept": _num(kept_iou[c]),
                                 "filtered_overall": _num(overall_iou[c])} for c, name in enumerate(classes)},
        # of the kept pixels labeled c, the fraction that truly are c
        "per_class_precision": {name: _num(p) for name, p in zip(classes, _safe_div(tp, kept.sum(0)))},
    }


def _safe_div(a, b):
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(b > 0, a / np.maximum(b, 1), np.nan)


def _nanmean(values) -> float | None:
    values = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(values)) if np.isfinite(values).any() else None


def _num(value) -> float | None:
    return None if not np.isfinite(value) else float(value)


def _ratio(a, b) -> float | None:
    return float(a) / float(b) if b else None


# ---------------------------------------------------------------- the record and its key

def _record(key: str, settings: Settings, store: LogitsStore, checksum: str, dataset: Dataset,
            hist: ScoreHistogram, thresholds: Thresholds) -> dict:
    from datetime import datetime, timezone

    classes = list(dataset.classes)
    per_class = thresholds.mode == "mondrian"
    counts = hist.counts.sum((0, 2))
    return {
        "key": key,
        "tool_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "alpha": settings.alpha,
        "mode": settings.mode,
        "rule": settings.rule,
        "classes": classes,
        "background": background_index(classes),
        "qhat": ({c: float(q) for c, q in zip(classes, thresholds.q)} if per_class else float(thresholds.q[0])),
        "min_probability": ({c: 1 - float(q) for c, q in zip(classes, thresholds.q)} if per_class
                            else 1 - float(thresholds.q[0])),
        "rank": {"k": thresholds.rank, "n": thresholds.n} if thresholds.mode != "crc" else None,
        "per_class_rank": ({c: {"k": k, "n": n} for c, (k, n) in zip(classes, thresholds.per_class_rank)}
                           if per_class else None),
        "fallbacks": [classes[c] for c in thresholds.fallbacks],
        "pooled_qhat": thresholds.pooled,
        "n_images": int(hist.images.sum()),
        "n_pixels": {c: int(n) for c, n in zip(classes, counts)},
        "store": {"path": str(store.path), "checksum": checksum,
                  **{k: store.attrs.get(k) for k in ("backend", "model_id", "score_kind", "scale")}},
        "settings": {"folds": settings.folds, "seed": settings.seed},
        "masks": None,
    }


def store_checksum(store: LogitsStore, ids: list[str]) -> str:
    """sha256 over the store's identity and, per listed image, its array's metadata file (size, mtime):
    a rescored image gets a new array, so the checksum changes without reading every chunk."""
    digest = hashlib.sha256()
    digest.update(json.dumps({k: store.attrs.get(k) for k in sorted(store.attrs) if k != "failed"},
                             sort_keys=True, default=str).encode())
    for image_id in sorted(ids):
        stat = (store.path / "scores" / image_id / "zarr.json").stat()
        digest.update(f"{image_id}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def fit_key(settings: Settings, dataset: Dataset, checksum: str, labeled: list[Sample]) -> str:
    """Changes when anything the fit depends on changes: settings, class list, scores, labeled masks."""
    digest = hashlib.sha256()
    digest.update(json.dumps([settings.alpha, settings.mode, settings.rule, settings.folds, settings.seed,
                              list(dataset.classes), __version__, checksum]).encode())
    for sample in labeled:
        stat = sample.mask.stat()
        digest.update(f"{sample.id}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def mask_key(key: str, store: LogitsStore, unlabeled: list[Sample]) -> str:
    """The fit's key plus the unlabeled images and their scores: names one complete set of masks."""
    digest = hashlib.sha256(key.encode())
    digest.update(store_checksum(store, [s.id for s in unlabeled]).encode())
    return digest.hexdigest()
