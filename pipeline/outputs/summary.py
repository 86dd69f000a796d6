"""`conformalsam summary`: what the pipeline produced, read back from disk (calibration.json, metrics.jsonl)."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from pipeline.stage1.record import describe_masks, masks_of, read_calibration, trained_masks
from pipeline.ui import percent, print_table


def _lines(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


def collect(work: Path) -> dict:
    """{"calibration": record or None, "runs": {name: {stage: {"best", "best_epoch", "last", "epochs",
    "masks"}}}}; "masks": what the run trained on (`pipeline.stage1.record.trained_masks`)."""
    calibration = read_calibration(work)
    runs: dict = {}
    for metrics in sorted((work / "runs").glob("*/stage*/metrics.jsonl")):
        lines = [x for x in _lines(metrics) if x.get("miou") is not None]
        if not lines:
            continue
        best = max(lines, key=lambda x: x["miou"])
        runs.setdefault(metrics.parent.parent.name, {})[metrics.parent.name] = {
            "best": best["miou"], "best_epoch": best["epoch"], "last": lines[-1]["miou"], "epochs": lines[-1]["epoch"],
            "masks": trained_masks(metrics.parent)}
    return {"calibration": calibration, "runs": runs}


def trained_on(masks, current: dict | None) -> str:
    """What a run trained on, and whether those are the masks on disk now."""
    said = describe_masks(masks)
    if isinstance(masks, dict) and current is not None:
        said += ", the current masks" if masks["key"] == (current.get("masks") or {}).get("key") else \
            ", recalibrated since"
    return said


def print_summary(work: Path, console: Console) -> dict:
    found = collect(work)
    calibration = found["calibration"]
    if calibration:
        unlabeled = calibration["diagnostics"].get("unlabeled") or {}
        quality = unlabeled.get("quality")
        console.print(f"pseudo-labels: {describe_masks(masks_of(calibration))}, calibrated on "
                      f"{calibration['n_images']} labeled images; "
                      f"{unlabeled.get('images', 0)} unlabeled masks keep {percent(unlabeled.get('kept_fraction'))}% of "
                      "pixels", highlight=False)
        if quality:
            table = Table(title="pseudo-label quality on the unlabeled images (against their ground truth)")
            for column in ("masks", "pixels scored", "mIoU %", "pixel acc. %"):
                table.add_column(column, justify="left" if column == "masks" else "right")
            table.add_row("raw foundation argmax", "all", percent(quality["raw"]["miou"]),
                          percent(quality["raw"]["pixel_accuracy"]))
            table.add_row("conformal-filtered", f"kept ({percent(unlabeled['kept_fraction'])}%)",
                          percent(quality["filtered_kept"]["miou"]), percent(quality["filtered_kept"]["pixel_accuracy"]))
            if "filtered_overall" in quality:  # an ignored pixel counted as a miss of its true class
                table.add_row("conformal-filtered, ignore = miss", "all",
                              percent(quality["filtered_overall"]["miou"]),
                              percent(quality["filtered_overall"]["pixel_accuracy"]))
            print_table(table, console)
    else:
        console.print(f"{work / 'calibration.json'}: no calibration yet")
    if found["runs"]:
        table = Table(title="trained models, val mIoU")
        for column in ("run", "stage", "trained on (stage II: its stage I)", "epochs", "best mIoU % (epoch)",
                       "last mIoU %"):
            table.add_column(column, justify="right" if "mIoU" in column or column == "epochs" else "left")
        names = {"stage1": "I", "stage2": "II: self-training", "stage2-unimatch": "II: UniMatch"}
        for run, stages in found["runs"].items():
            for stage, r in sorted(stages.items()):
                table.add_row(run, names.get(stage, stage), trained_on(r["masks"], calibration), str(r["epochs"]),
                              f"{percent(r['best'])} ({r['best_epoch']})", percent(r["last"]))
        print_table(table, console)
    else:
        console.print(f"{work / 'runs'}: no trained model with val scores yet")
    return found
