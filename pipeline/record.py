"""The cached filtered masks as the later stages read them: `<work>/masks/<id>.png`, valid only while
their `.key` equals the one calibration.json records (the trainer and `export` both check it)."""

from __future__ import annotations

from pathlib import Path

from pipeline.calibrate import CALIBRATION, KEY_FILE, MASKS, read_calibration
from pipeline.datasets import Sample
from pipeline.errors import UserError


def cached_masks(work: Path, samples: list[Sample], allow_missing: bool, fix: str) -> tuple[list[Sample], str, int]:
    """(the samples that have a cached mask of the current calibration, that calibration's key, how many
    have none). A missing mask is an error naming it unless ``allow_missing``; ``fix`` names the flag that
    allows it."""
    masks = Path(work) / MASKS
    key = (read_calibration(work, required=True).get("masks") or {}).get("key")
    try:
        on_disk = (masks / KEY_FILE).read_text().strip()
    except OSError:
        on_disk = None
    if key is None or key != on_disk:
        raise UserError(f"{masks}: the cached masks do not belong to {Path(work) / CALIBRATION} (was it run with "
                        "--no-masks?); rerun `conformalsam calibrate` without --no-masks")
    present = {p.stem for p in masks.glob("*.png")}
    missing = [s.id for s in samples if s.id not in present]
    if missing and not allow_missing:
        raise UserError(f"{masks / (missing[0] + '.png')}: cached mask missing for unlabeled image '{missing[0]}' "
                        f"({len(missing)} missing in all); rerun `conformalsam calibrate` or pass {fix}")
    return [s for s in samples if s.id in present], key, len(missing)
