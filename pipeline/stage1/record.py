"""The calibration record, as stage 1 writes it and the later stages read it: `<work>/calibration.json`
(thresholds, settings, diagnostics), its histograms, and the cached filtered masks `<work>/masks/<id>.png`,
valid only while their `.key` equals the one calibration.json records. Small on purpose: the trainer and
`export` read the record without importing the calibration stage."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

from pipeline.atomic import write_text_atomic
from pipeline.data.datasets import Sample
from pipeline.errors import UserError

CALIBRATION = "calibration.json"
HISTOGRAMS = "calibration-histograms.npz"  # the score histograms behind calibration.json (alpha sweeps)
MASKS = "masks"
KEY_FILE = ".key"
SUMS_FILE = ".sums"  # id -> CRC-32 of each mask as written: damage is found and mended by `calibrate`
RUN_FILE = "run.json"  # in a training run's folder: {"stage", "method", "masks": `masks_of`, None or UNRECORDED}
UNRECORDED = "unrecorded"  # a stage II run started from a checkpoint that does not say what it trained on


def _read_json(path: Path):
    """A JSON file's contents; None when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def read_calibration(work: Path, required: bool = False) -> dict | None:
    """The record of ``<work>/calibration.json``; None when there is none, or a clear error if ``required``."""
    path = Path(work) / CALIBRATION
    record = _read_json(path)
    if record is None and required:
        raise UserError(f"{path}: no calibration; run `conformalsam calibrate` first")
    return record


def write_run_record(run: Path, stage: int, method: str, masks) -> None:
    """``run``'s RUN_FILE: what the run in that folder trained on (``masks``: `masks_of`, None or UNRECORDED)."""
    write_text_atomic(Path(run) / RUN_FILE, json.dumps({"stage": stage, "method": method, "masks": masks}))


def trained_masks(run: Path):
    """What the run in folder ``run`` trained on, from its RUN_FILE; UNRECORDED when it has none (an earlier
    version's run)."""
    return (_read_json(Path(run) / RUN_FILE) or {}).get("masks", UNRECORDED)


def masks_of(record: dict) -> dict:
    """What a run trained on says of a calibration: its mode, rule and alpha, and its masks' key."""
    return {"mode": record.get("mode"), "rule": record.get("rule"), "alpha": record.get("alpha"),
            "key": (record.get("masks") or {}).get("key")}


def describe_masks(masks: dict | None) -> str:
    """``masks_of``'s record in words; None: a labeled-only run, which read no masks."""
    if masks is None:
        return "labeled only"
    if masks == UNRECORDED:
        return "not recorded"
    if masks["rule"] == "argmax":
        return "raw masks (rule argmax)"
    return f"filtered masks ({masks['mode']}, alpha {masks['alpha']:g}, rule {masks['rule']})"


def cached_masks(work: Path, samples: list[Sample], allow_missing: bool, fix: str) -> tuple[list[Sample], dict, int]:
    """(the samples that have a cached mask of the current calibration, that calibration as `masks_of` says
    it, how many have none). A missing mask is an error naming it unless ``allow_missing``; ``fix`` names the
    flag that allows it."""
    masks = Path(work) / MASKS
    calibration = masks_of(read_calibration(work, required=True))
    key = calibration["key"]
    try:
        on_disk = (masks / KEY_FILE).read_text().strip()
    except OSError:
        on_disk = None
    if key is None or key != on_disk:
        raise UserError(f"{masks}: the cached masks do not belong to {Path(work) / CALIBRATION} (was it run with "
                        "--no-masks?); rerun `conformalsam calibrate` without --no-masks")
    present = {p.stem for p in masks.glob("*.png")}
    _check_sums(masks, [s.id for s in samples if s.id in present])
    missing = [s.id for s in samples if s.id not in present]
    if missing and not allow_missing:
        failed = _unreadable(Path(work))
        if missing[0] in failed:  # calibrate skipped it: rerunning calibrate cannot help
            raise UserError(f"unlabeled image '{missing[0]}' has no mask: stage 0 could not read it "
                            f"({failed[missing[0]]}); fix the image and rerun `logits` and `calibrate`, remove it "
                            f"from the unlabeled split, or pass {fix} ({len(missing)} without a mask in all)")
        raise UserError(f"{masks / (missing[0] + '.png')}: cached mask missing for unlabeled image '{missing[0]}' "
                        f"({len(missing)} missing in all); rerun `conformalsam calibrate` or pass {fix}")
    return [s for s in samples if s.id in present], calibration, len(missing)


def _unreadable(work: Path) -> dict[str, str]:
    """Image id -> why stage 0 could not read it, from the score store's record."""
    try:
        return dict(json.loads((work / "logits.zarr" / "zarr.json").read_text())["attributes"].get("failed", {}))
    except (OSError, ValueError, KeyError):
        return {}


def file_crc(path: Path) -> int | None:
    """CRC-32 of a file's bytes; None when it cannot be read."""
    try:
        return zlib.crc32(Path(path).read_bytes())
    except OSError:
        return None


def damaged_masks(masks: Path, ids: list[str]) -> list[str] | None:
    """The ids whose mask differs from the bytes calibrate wrote (missing, truncated, overwritten), by the
    CRC-32 sums it recorded: a read of every mask, well under a second for 10,000. None for a set written
    before sums were recorded."""
    try:
        sums = json.loads((Path(masks) / SUMS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return [i for i in ids if file_crc(Path(masks) / f"{i}.png") != sums.get(i)]


def _check_sums(masks: Path, ids: list[str]) -> None:
    """Refuse a damaged mask, so training never starts on a damaged set."""
    damaged = damaged_masks(masks, ids) or []
    if damaged:
        raise UserError(f"{masks / (damaged[0] + '.png')}: cached mask is damaged (its bytes changed since "
                        "calibrate wrote it); rerun `conformalsam calibrate`: it rewrites damaged masks")
