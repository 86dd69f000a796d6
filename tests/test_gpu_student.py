"""The GPU kit's own logic (benchmarks/gpu_student.py): its run on real data is `make gpu-student-smoke`."""

from __future__ import annotations

import filecmp
import json
import sys

import numpy as np
import pytest

from pipeline import PROJECT_ROOT
from pipeline.labels import write_palette_png
from pipeline.stage1.record import KEY_FILE, SUMS_FILE, file_crc

sys.path.insert(0, str(PROJECT_ROOT / "benchmarks"))
import gpu_student  # noqa: E402


def test_packed_masks_come_back_byte_for_byte_with_their_key_and_sums(tmp_path):
    rng = np.random.default_rng(0)
    masks = tmp_path / "masks"
    masks.mkdir()
    sums = {}
    for i, shape in enumerate([(20, 30), (24, 32), (20, 30)]):
        label = rng.integers(0, 11, shape, dtype=np.uint8)
        label[rng.random(shape) < 0.3] = 255
        write_palette_png(masks / f"img{i}.png", label)
        sums[f"img{i}"] = file_crc(masks / f"img{i}.png")
    (masks / SUMS_FILE).write_text(json.dumps(sums) + "\n")
    (masks / KEY_FILE).write_text("abc123\n")
    packed = tmp_path / "packed"
    packed.mkdir()
    gpu_student.pack_masks(masks, packed)
    gpu_student.unpack_masks(packed, tmp_path / "again")
    for name in ["img0.png", "img1.png", "img2.png", KEY_FILE, SUMS_FILE]:
        assert filecmp.cmp(masks / name, tmp_path / "again" / name, shallow=False), name


def test_split_lists_point_at_the_jpeg_images_and_keep_the_masks(tmp_path):
    (tmp_path / "a.txt").write_text("train/x1.png trainannot/x1.png\ntrain/x2.png\n")
    gpu_student._relist(tmp_path / "a.txt", tmp_path / "b" / "a.txt")
    assert (tmp_path / "b" / "a.txt").read_text() == "train/x1.jpg trainannot/x1.png\ntrain/x2.jpg\n"


@pytest.mark.parametrize("curves,within,epochs", [
    ({"a": [0.30, 0.40, 0.45, 0.452, 0.451]}, 0.005, 3),  # within half a point of the best from epoch 3
    ({"a": [0.30, 0.40, 0.45, 0.452, 0.451], "b": [0.2, 0.3, 0.35, 0.4, 0.5]}, 0.005, 5),  # still rising
    ({"a": [0.5, 0.4, 0.3]}, 0.005, 1),
])
def test_masked_runs_last_until_the_labeled_only_curves_stop_rising(curves, within, epochs):
    assert gpu_student.plateau({k: np.array(v) for k, v in curves.items()}, within) == epochs


def test_the_rows_length_is_cut_to_what_the_budget_leaves():
    costs = {"1_2": (10.0, 4.0), "1_4": (20.0, 4.0)}  # training seconds an epoch, seconds a validation
    # e epochs cost 7 runs x (30 e + 8 ceil(e / 2)) / 2 jobs: 133 s for 1, 238 for 2
    assert gpu_student.fit_epochs(5, costs, 7, 2, 10_000) == 5
    assert gpu_student.fit_epochs(5, costs, 7, 2, 240) == 2 and gpu_student.fit_epochs(5, costs, 7, 2, 230) == 1
    assert gpu_student.fit_epochs(5, costs, 7, 2, 10) == 1  # at least one epoch
