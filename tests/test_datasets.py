from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from conftest import make_config, write_gray_png, write_image
from pipeline.data.datasets import ADE20K_CLASSES, VOC_CLASSES, Dataset, parse_split, read_image
from pipeline.errors import DataProblem, UserError
from pipeline.labels import write_palette_png


def _voc(tmp_path, rng):
    root = tmp_path / "VOC2012"
    lines = []
    for i in range(3):
        write_image(root / "JPEGImages" / f"2007_00{i}.jpg", rng)
        mask = rng.integers(0, 21, (24, 32))
        mask[0, :5] = 255
        (root / "SegmentationClass").mkdir(parents=True, exist_ok=True)
        write_palette_png(root / "SegmentationClass" / f"2007_00{i}.png", mask)
        lines.append(f"JPEGImages/2007_00{i}.jpg SegmentationClass/2007_00{i}.png")
    (tmp_path / "labeled.txt").write_text("\n".join(lines[:2]) + "\n")
    (tmp_path / "unlabeled.txt").write_text("JPEGImages/2007_002.jpg\n")  # mask omitted: allowed
    return make_config(root, "voc", tmp_path / "labeled.txt", tmp_path / "unlabeled.txt")


def test_voc_reads_palette_masks_and_keeps_ignore(tmp_path):
    rng = np.random.default_rng(0)
    ds = Dataset(_voc(tmp_path, rng))
    assert ds.classes == VOC_CLASSES and ds.num_classes == 21
    labeled = ds.split("labeled")
    assert [s.id for s in labeled] == ["2007_000", "2007_001"]
    image, mask = ds.load(labeled[0])
    assert image.shape == (24, 32, 3) and image.dtype == np.uint8
    assert mask.shape == (24, 32) and (mask[0, :5] == 255).all() and mask[mask != 255].max() <= 20
    unlabeled = ds.split("unlabeled")
    assert unlabeled[0].mask is None and ds.load(unlabeled[0])[1] is None


def test_ade20k_maps_zero_to_ignore_and_shifts_classes(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "ADEChallengeData2016"
    write_image(root / "images/training/ADE_train_00000001.jpg", rng)
    raw = rng.integers(0, 151, (24, 32))
    raw[0, 0], raw[0, 1], raw[0, 2] = 0, 1, 150
    write_gray_png(root / "annotations/training/ADE_train_00000001.png", raw)
    (tmp_path / "l.txt").write_text("images/training/ADE_train_00000001.jpg annotations/training/ADE_train_00000001.png\n")
    ds = Dataset(make_config(root, "ade20k", tmp_path / "l.txt", tmp_path / "l.txt"))
    assert len(ds.classes) == 150 == len(set(ADE20K_CLASSES))
    _, mask = ds.load(ds.split("labeled")[0])
    assert mask[0, 0] == 255 and mask[0, 1] == 0 and mask[0, 2] == 149
    np.testing.assert_array_equal(mask, np.where(raw == 0, 255, raw - 1))


def test_folder_format_reads_classes_txt(toy_world):
    from conftest import toy_config

    ds = Dataset(toy_config(toy_world))
    assert ds.classes[0] == "background" and ds.num_classes >= 8
    image, mask = ds.load(ds.split("val")[0])
    assert image.shape == (32, 32, 3) and set(np.unique(mask)) <= set(range(ds.num_classes))


def test_config_classes_override_folder_list(toy_world):
    from conftest import toy_config
    from dataclasses import replace

    ds = Dataset(replace(toy_config(toy_world), classes=("bg", "a", "b", "c", "d", "e", "f", "g")))
    assert ds.classes == ("bg", "a", "b", "c", "d", "e", "f", "g")


@settings(max_examples=30, deadline=None)
@given(arrays(np.uint8, st.tuples(st.integers(1, 12), st.integers(1, 12)),
              elements=st.one_of(st.integers(0, 7), st.just(255))))
def test_folder_mask_roundtrip(tmp_path_factory, mask):
    root = tmp_path_factory.mktemp("rt")
    (root / "classes.txt").write_text("\n".join(f"c{i}" for i in range(8)))
    write_palette_png(root / "m.png", mask)
    ds = Dataset(make_config(root, "folder", root / "x", root / "x"))
    np.testing.assert_array_equal(ds.read_mask(root / "m.png", mask.shape), mask)


# ---- split lists -------------------------------------------------------------------------------

def test_split_problems_are_all_collected(tmp_path):
    split = tmp_path / "s.txt"
    split.write_text("a.jpg a.png\n\nb.jpg\nc.jpg c.png extra\nd/a.jpg d/a.png\n")
    samples, problems = parse_split(split, tmp_path, need_masks=True)
    assert [s.id for s in samples] == ["a"]
    kinds = sorted(p.kind for p in problems)
    assert kinds == ["bad split line", "bad split line", "duplicate id"]
    assert any(f"{split}:3" in str(p) for p in problems)  # the line number is named


def test_split_empty_and_missing(tmp_path):
    (tmp_path / "e.txt").write_text("\n  \n")
    assert parse_split(tmp_path / "e.txt", tmp_path, True)[1][0].kind == "empty split"
    assert parse_split(tmp_path / "nope.txt", tmp_path, True)[1][0].kind == "missing split file"


def test_split_raises_first_problem_with_count(tmp_path):
    (tmp_path / "l.txt").write_text("a.jpg\nb.jpg\n")
    ds = Dataset(make_config(tmp_path, "voc", tmp_path / "l.txt", tmp_path / "l.txt"))
    with pytest.raises(DataProblem, match=r"l.txt:1.*and 1 more"):
        ds.split("labeled")
    assert [s.id for s in ds.split("unlabeled")] == ["a", "b"]


# ---- validation errors ---------------------------------------------------------------------------

@pytest.fixture
def folder_ds(tmp_path):
    (tmp_path / "classes.txt").write_text("background\nthing\nother\n")
    return Dataset(make_config(tmp_path, "folder", tmp_path / "l.txt", tmp_path / "u.txt"))


def test_missing_and_corrupt_image(tmp_path, folder_ds):
    with pytest.raises(DataProblem, match="not found") as err:
        read_image(tmp_path / "none.jpg")
    assert err.value.kind == "missing image"
    write_image(tmp_path / "ok.jpg", np.random.default_rng(0))
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataProblem) as err:
        read_image(tmp_path / "cut.jpg")
    assert err.value.kind == "corrupt image" and "cut.jpg" in str(err.value)


def test_mask_size_values_and_mode(tmp_path, folder_ds):
    write_palette_png(tmp_path / "m.png", np.zeros((10, 12), np.uint8))
    with pytest.raises(DataProblem, match="12x10 but its image is 13x10") as err:
        folder_ds.read_mask(tmp_path / "m.png", (10, 13))
    assert err.value.kind == "mask size mismatch"
    bad = np.zeros((4, 4), np.uint8)
    bad[1, 1], bad[2, 2] = 37, 255
    write_palette_png(tmp_path / "v.png", bad)
    with pytest.raises(DataProblem, match=r"values 37 outside 0..2 or 255") as err:
        folder_ds.read_mask(tmp_path / "v.png")
    assert err.value.kind == "mask values out of range"
    write_image(tmp_path / "rgb.png", np.random.default_rng(0), (4, 4))
    with pytest.raises(DataProblem, match="mode RGB") as err:
        folder_ds.read_mask(tmp_path / "rgb.png")
    assert err.value.kind == "not a class-index mask"
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(DataProblem) as err:
        folder_ds.read_mask(tmp_path / "junk.png")
    assert err.value.kind == "corrupt mask"


def test_folder_without_classes_txt_is_a_user_error(tmp_path):
    ds = Dataset(make_config(tmp_path, "folder", tmp_path / "l.txt", tmp_path / "u.txt"))
    with pytest.raises(UserError, match="classes.txt"):
        ds.classes
