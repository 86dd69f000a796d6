"""`conformalsam export`: split files read back with a reader written from UniMatch's `SemiDataset`
(lines split on one space, each path joined to data_root), every path there, every mask class ids or 255."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cli import app
from conftest import fresh, make_config
from pipeline.data.datasets import Dataset
from pipeline.errors import UserError
from pipeline.outputs.export import export
from pipeline.labels import write_palette_png
from pipeline.data.splits import source_lines, write_split
from test_splits import camvid_tree


def unimatch_read(data_root, id_path):
    """What UniMatch's dataset/semi.py does with a split file: (image, mask) arrays per line."""
    with open(id_path) as f:
        ids = f.read().splitlines()
    for line in ids:
        img = Image.open(os.path.join(data_root, line.split(" ")[0])).convert("RGB")
        mask = np.array(Image.open(os.path.join(data_root, line.split(" ")[1])))
        yield line, np.asarray(img), mask


def check_pairs(root, path, num_classes):
    lines = []
    for line, img, mask in unimatch_read(root, path):
        assert mask.ndim == 2 and mask.shape == img.shape[:2], line
        assert np.isin(mask, [*range(num_classes), 255]).all(), line
        lines.append(line)
    return lines


def first_image(config):
    return Path(open(config.labeled).readline().split()[0])


def test_unimatch_export_of_a_calibrated_toy_world(toy_world, calibrated, tmp_path):
    config = fresh(toy_world, calibrated, tmp_path)
    dataset = Dataset(config)
    result = CliRunner().invoke(app, ["export", str(tmp_path / "out"), "--root", str(config.root), "--labeled",
                                      str(config.labeled), "--unlabeled", str(config.unlabeled), "--work-dir",
                                      str(config.work_dir), "--format", "folder", "--val", str(config.val)],
                                terminal_width=300)
    assert result.exit_code == 0, result.output
    val = check_pairs(config.root, tmp_path / "out/val.txt", dataset.num_classes)  # for UniMatch's splits/
    assert val == [f"{s.image.relative_to(config.root)} {s.mask.relative_to(config.root)}" for s in dataset.split("val")]
    assert "--labeled-id-path" in result.output
    labeled = check_pairs(config.root, tmp_path / "out/labeled.txt", dataset.num_classes)
    unlabeled = check_pairs(config.root, tmp_path / "out/unlabeled.txt", dataset.num_classes)
    n_l, n_u = len(dataset.split("labeled")), len(dataset.split("unlabeled"))
    repeats = round(n_u / n_l)
    # UniMatch keeps the first len(unlabeled.txt) labeled lines: equal lengths, so every line is used
    assert len(labeled) == len(unlabeled) == repeats * n_l + n_u and repeats > 1
    gt = [f"{s.image.relative_to(config.root)} {s.mask.relative_to(config.root)}" for s in dataset.split("labeled")]
    assert labeled[:repeats * n_l] == gt * repeats
    assert labeled[repeats * n_l:] == unlabeled[:n_u] and len(set(unlabeled)) == n_u
    for line in unlabeled:  # the filtered masks, byte for byte, and the user's data untouched
        image, mask = line.split(" ")
        stem = os.path.basename(mask)
        assert open(mask, "rb").read() == (config.work_dir / "masks" / stem).read_bytes()
        assert not image.startswith("/") and (config.root / image).is_file()

    # an existing export is kept unless --force; a list export names absolute pairs
    with pytest.raises(UserError, match="exists: pass --force"):
        export(config, "unimatch", tmp_path / "out")
    export(config, "list", tmp_path / "out", force=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["masks", "pseudo.txt"]
    pairs = check_pairs("/nowhere", tmp_path / "out/pseudo.txt", dataset.num_classes)
    assert len(pairs) == n_u and all(os.path.isabs(p) for line in pairs for p in line.split(" "))
    with pytest.raises(UserError, match="--to bogus: choose one of unimatch, list"):
        export(config, "bogus", tmp_path / "other")
    with pytest.raises(UserError, match="path with a space"):
        export(config, "list", tmp_path / "with space")
    assert not (tmp_path / "with space").exists() and not list(tmp_path.glob(".*export*"))
    # --force replaces a whole folder: never the data set, the work folder, or a folder holding them
    for danger in (config.root, config.work_dir, config.work_dir / "masks", config.root.parent, tmp_path):
        with pytest.raises(UserError, match="export to a folder of its own"):
            export(config, "unimatch", danger, force=True)
    assert (config.work_dir / "masks" / ".key").exists() and (config.root / first_image(config)).exists()


def test_unimatch_export_converts_labels_that_are_not_class_ids(tmp_path):
    """CamVid's void (11) and stale masks: the labeled lines point at converted copies (void -> 255)."""
    rng = np.random.default_rng(0)
    root = camvid_tree(tmp_path / "CamVid", rng)
    write_split(source_lines(root / "train", root, root / "trainannot"), 4, 0, tmp_path / "splits")
    config = make_config(root, "camvid", tmp_path / "splits/labeled.txt", tmp_path / "splits/unlabeled.txt")
    work = config.work_dir
    (work / "masks").mkdir(parents=True)
    (work / "calibration.json").write_text(json.dumps({"masks": {"key": "k1"}}))
    (work / "masks" / ".key").write_text("k1\n")
    unlabeled = Dataset(config).split("unlabeled")
    for sample in unlabeled[1:]:  # the first has no filtered mask (stage 0 could not read it)
        filtered = rng.integers(0, 11, (18, 24)).astype(np.uint8)
        filtered[:3] = 255
        write_palette_png(work / "masks" / f"{sample.id}.png", filtered)
    warnings = []
    result = export(config, "unimatch", tmp_path / "out", warn=warnings.append)
    assert result["unlabeled"] == len(unlabeled) - 1 and "1 unlabeled images have no filtered mask" in warnings[0]
    labeled = check_pairs(root, tmp_path / "out/labeled.txt", 11)
    assert all((np.array(Image.open(line.split(" ")[1]))[:3] == 255).all() for line in labeled[-3:])  # ignore kept
    assert len(labeled) == 4 * round(len(unlabeled[1:]) / 4) + len(unlabeled) - 1
    for line in labeled[:4]:
        image, mask = line.split(" ")
        raw = np.array(Image.open(root / "trainannot" / os.path.basename(image)))
        converted = np.array(Image.open(mask))
        assert ((converted == 255) == (raw == 11)).all() and mask.startswith(str(tmp_path / "out" / "labels"))
    (work / "masks" / ".key").write_text("stale\n")
    with pytest.raises(UserError, match="do not belong"):
        export(config, "unimatch", tmp_path / "again")


def test_the_docs_export_examples_are_accepted(toy_world, calibrated, tmp_path, monkeypatch):
    """The README's and docs' commands, run where their config's work folder is ./work (the presets' layout)."""
    import re

    from pipeline import PROJECT_ROOT

    pages = [PROJECT_ROOT / "README.md", *(PROJECT_ROOT / "docs").glob("*.md")]
    shown = {page.name: re.findall(r"^conformalsam export --to unimatch (\S+)", page.read_text(), flags=re.M)
             for page in pages}
    assert shown["README.md"] and shown["handover.md"]  # the quick start and the hand-over page
    destinations = sorted({d for found in shown.values() for d in found})
    config = fresh(toy_world, calibrated, tmp_path)
    monkeypatch.chdir(config.work_dir.parent)
    for destination in destinations:
        result = export(config, "unimatch", Path(destination))
        assert (result["out"] / "labeled.txt").is_file()
