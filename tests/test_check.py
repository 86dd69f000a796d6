"""`conformalsam data check` reports every planted problem and exits non-zero; a clean set exits 0."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
from typer.testing import CliRunner

from cli import app
from conftest import toy_config
from pipeline.data.check import check_dataset
from pipeline.data.datasets import Dataset
from pipeline.labels import write_palette_png

ROOT = __import__("pipeline").PROJECT_ROOT


def _flags(world):
    cfg = toy_config(world)
    return ["--format", "folder", "--root", str(cfg.root), "--labeled", str(cfg.labeled),
            "--unlabeled", str(cfg.unlabeled), "--val", str(cfg.val)]


def test_clean_world_exits_zero(toy_world):
    result = CliRunner().invoke(app, ["data", "check", *_flags(toy_world)])
    assert result.exit_code == 0, result.output
    assert check_dataset(Dataset(toy_config(toy_world))).ok


def test_planted_problems_are_all_reported(toy_world, tmp_path):
    world = tmp_path / "toy"
    shutil.copytree(toy_world, world)
    target = world / "target"
    labeled = (world / "splits/16/labeled.txt").read_text().split("\n")
    ids = [line.split()[0][len("images/"):-4] for line in labeled if line]
    # corrupt JPEG, wrong-size mask, value 37, missing image, missing mask, duplicate line
    jpg = target / "images" / f"{ids[0]}.jpg"
    jpg.write_bytes(jpg.read_bytes()[:200])
    write_palette_png(target / "masks" / f"{ids[1]}.png", np.zeros((16, 16), np.uint8))
    bad = np.zeros((32, 32), np.uint8)
    bad[3, 3] = 37
    write_palette_png(target / "masks" / f"{ids[2]}.png", bad)
    (target / "images" / f"{ids[3]}.jpg").unlink()
    (target / "masks" / f"{ids[4]}.png").unlink()
    with open(world / "splits/16/labeled.txt", "a") as f:
        f.write(labeled[5] + "\n")
    report = check_dataset(Dataset(toy_config(world)))
    counts = {kind: len(msgs) for kind, msgs in report.problems.items()}
    assert counts == {"corrupt image": 1, "mask size mismatch": 1, "mask values out of range": 1,
                      "missing image": 1, "missing mask": 1, "duplicate id": 1}
    assert ids[2] in report.problems["mask values out of range"][0]
    result = CliRunner().invoke(app, ["data", "check", *_flags(world)], terminal_width=200)
    assert result.exit_code == 1
    for kind in counts:
        assert kind in result.output


def test_overlapping_splits_are_reported(toy_world, tmp_path):
    val = tmp_path / "val.txt"
    val.write_text((toy_world / "splits/16/labeled.txt").read_text().splitlines()[0] + "\n")
    from dataclasses import replace

    report = check_dataset(Dataset(replace(toy_config(toy_world), val=val)))
    assert list(report.problems) == ["split overlap"]


def test_user_error_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), "data", "check", "--config", str(tmp_path / "x.toml")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "x.toml" in lines[0] and "Traceback" not in proc.stderr
