"""The tables of bench-student / bench-regime, rendered from a made-up report: every row and mark is where the
figures say (a benchmark of hours must not fail or mislabel at its last step)."""

from __future__ import annotations

import argparse
import sys

from pipeline import PROJECT_ROOT

sys.path.insert(0, str(PROJECT_ROOT / "benchmarks"))
import bench_student  # noqa: E402
from bench_student import RAW, Settings  # noqa: E402

CLASSES = ("Sky", "Pole")


def masks(kept: float, acc: float) -> dict:
    return {"kept": kept, "acc_kept": acc, "miou_kept": acc - 0.2, "miou_raw": 0.5,
            "per_class": {"Sky": (kept, 0.99, 0.9, 0.95), "Pole": (kept / 10, 0.5, 0.2, 0.3)}}


def report(stage1_only: bool) -> tuple[dict, argparse.Namespace, dict]:
    args = argparse.Namespace(splits=["1_2"], variants=["crc", "mondrian", "paper"], stage1_only=stage1_only)
    variants = {("weak", "1_2"): {"raw": RAW, "crc": bench_student.CP["crc"], "mondrian": bench_student.CP["mondrian"],
                                  "paper": Settings(alpha=0.3, mode="paper", rule="paper")}}
    runs = {"1_2|labeled": [0.50, 0.51, 0.52],  # the student, above its raw masks beyond the seed spread
            "1_2|weak:raw-I": [0.46, 0.47, 0.48], "1_2|weak:crc-I": [0.53, 0.54, 0.55],
            "1_2|weak:mondrian-I": [0.47, 0.50, 0.53], "1_2|weak:paper-I": [0.45, 0.455, 0.46]}
    if not stage1_only:
        runs.update({k.replace("-I", "-II"): v for k, v in runs.items() if k.endswith("-I")})
    report = {"annotators": {"weak": {"val_miou": 0.447, "val_pixel_accuracy": 0.75, "val_iou": {"Sky": 0.8, "Pole": 0.1},
                             "paper": {"1_2": {"alpha": 0.3, "grid": {"0.3": {"kept": 0.7, "accuracy": 0.96}}}}}},
        "runs": {k: {"best": v, "last": [x - 0.01 for x in v], "best_iou": [[x + 0.3, x / 2] for x in v]}
                 for k, v in runs.items()},
        "masks": {"weak|1_2|raw": masks(1.0, 0.75), "weak|1_2|crc": masks(0.6, 0.95),
                  "weak|1_2|mondrian": masks(0.7, 0.9), "weak|1_2|paper": masks(0.65, 0.96)}}
    return report, args, variants


def row(text: str, *start: str) -> list[str]:
    """The cells of the first table row that begins with these cells."""
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[:len(start)] == list(start):
            return cells
    raise AssertionError(f"no row {start}")


def test_the_regime_tables_say_what_the_figures_say():
    text = bench_student.render(*report(stage1_only=True))
    best = row(text, "1_2", "weak", "51.0 (50.0-52.0)")
    assert best[3:] == ["47.0 (46.0-48.0)", "54.0 (53.0-55.0)", "50.0 (47.0-53.0)", "45.5 (45.0-46.0)"]
    header = row(text, "labeled", "annotator", "raw - labeled only")
    diffs = dict(zip(header, row(text, "1_2", "weak", "-4.0 < / -4.0 <")))
    assert diffs["crc I - raw"] == "+7.0 > / +7.0 >" and diffs["mondrian I - raw"] == "+3.0 / +3.0"
    assert diffs["crc I - labeled only"] == "+3.0 > / +3.0 >" and diffs["paper I - labeled only"] == "-5.5 < / -5.5 <"
    assert "raw II" not in text and "stage II" not in text
    gap = row(text, "1_2", "weak", "44.7")
    assert gap[3:5] == ["51.0", "+6.3"] and "crc 60.0 @ 95.0" in gap[5] and "raw 100.0 @ 75.0" in gap[5]
    pole = row(text, "Pole", "20.0")
    assert pole[2:] == ["6.0 / 50.0", "7.0 / 50.0", "6.5 / 50.0"]
    assert row(text, "weak", "44.7", "75.0")[3] == "0.3 (70 / 96.0)"
    header = row(text, "class", "annotator", "labeled only")
    assert header[3:] == ["+ raw", "+ crc", "+ mondrian", "+ paper"]
    assert row(text, "Sky", "80.0") == ["Sky", "80.0", "81.0", "77.0", "84.0", "80.0", "75.5"]
    assert row(text, "Pole", "10.0")[2:4] == ["25.5", "23.5"]


def test_with_stage_two_every_variant_has_its_stage_two_column():
    text = bench_student.render(*report(stage1_only=False))
    header = row(text, "labeled", "annotator", "labeled only")
    assert header[3:] == ["+ raw, stage I", "+ raw, stage II"] + [f"+ {v}, stage {s}" for v in ("crc", "mondrian", "paper")
                                                                  for s in ("I", "II")]
    assert "crc II - raw II" in row(text, "labeled", "annotator", "raw - labeled only")
