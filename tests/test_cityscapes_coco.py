"""Cityscapes and COCO in UniMatch's layouts, read through split files in UniMatch's exact line format;
`config init <preset>` + `data check` work without editing; planted faults are reported; labelIds are
converted, never read as trainIds."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cli import app
from pipeline import PROJECT_ROOT, config as cfg
from pipeline.data.check import check_dataset
from pipeline.data.convert import to_train_ids
from pipeline.data.datasets import CITYSCAPES_CLASSES, COCO_CLASSES, Dataset
from pipeline.data.prompts import prompts_for
from trainer.recipes import get_recipe

SIZE = (16, 32)  # H, W: Cityscapes' 1:2


def png(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8), mode).save(path)


def cityscapes_tree(root, rng, labeled=3, unlabeled=5, val=2, with_train_ids=True):
    """leftImg8bit/<split>/<city>/..._leftImg8bit.png + gtFine/<split>/<city>/..._gtFine_label{,Train}Ids.png,
    and UniMatch's split files for them; returns the split folder."""
    lines = {"train": [], "val": []}
    for split, count, city in (("train", labeled + unlabeled, "jena"), ("val", val, "frankfurt")):
        for i in range(count):
            stem = f"{city}_{i:06d}_000019"
            png(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", rng.integers(0, 256, (*SIZE, 3)))
            label_ids = rng.choice([0, 1, 7, 8, 11, 21, 23, 24, 26, 33], SIZE)
            png(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", label_ids)
            if with_train_ids:
                png(root / "gtFine" / split / city / f"{stem}_gtFine_labelTrainIds.png", to_train_ids(label_ids))
            lines[split].append(f"leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png "
                                f"gtFine/{split}/{city}/{stem}_gtFine_labelTrainIds.png")
    return lines


def write_splits(folder, lines, labeled):
    (folder / "1_16").mkdir(parents=True, exist_ok=True)
    (folder / "1_16" / "labeled.txt").write_text("\n".join(lines["train"][:labeled]) + "\n")
    (folder / "1_16" / "unlabeled.txt").write_text("\n".join(lines["train"][labeled:]) + "\n")
    (folder / "val.txt").write_text("\n".join(lines["val"]) + "\n")


def test_label_ids_map_to_train_ids_as_cityscapes_defines():
    ids = np.array([[7, 8, 11, 26], [0, 1, 33, 255]])
    assert to_train_ids(ids).tolist() == [[0, 1, 2, 13], [255, 255, 18, 255]]
    assert len(CITYSCAPES_CLASSES) == 19 and len(COCO_CLASSES) == 81 and COCO_CLASSES[80] == "toothbrush"


def test_cityscapes_preset_checks_clean_and_reports_planted_faults(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    lines = cityscapes_tree(tmp_path / "data" / "cityscapes", rng)
    write_splits(tmp_path / "data" / "splits" / "cityscapes", lines, 3)
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    assert runner.invoke(app, ["config", "init", "cityscapes-1_16"]).exit_code == 0
    result = runner.invoke(app, ["data", "check"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "3 labeled, 5 unlabeled, 2 val; 19 classes" in " ".join(result.output.split())
    config = cfg.load(None)
    dataset = Dataset(config)
    assert config.format == "cityscapes" and dataset.classes == CITYSCAPES_CLASSES
    sample = dataset.split("labeled")[0]
    mask = dataset.load(sample)[1]
    assert sample.id.endswith("_leftImg8bit") and set(np.unique(mask)) <= set(range(19)) | {255}

    root = tmp_path / "data" / "cityscapes" / "gtFine"
    masks = sorted(root.rglob("*_labelTrainIds.png"))
    masks[0].unlink()  # only the official labelIds left: reported, never read in its place
    png(masks[1], np.full(SIZE, 19))  # a trainIds file with a value 19..254
    missing = masks[2]
    missing.unlink()
    missing.with_name(missing.name.replace("labelTrainIds", "labelIds")).unlink()  # no mask at all
    report = check_dataset(dataset, n_jobs=1)
    assert set(report.problems) == {"labelIds, no trainIds", "mask values out of range", "missing mask"}
    assert "run `conformalsam data convert`" in report.problems["labelIds, no trainIds"][0]
    assert "outside 0..18 or 255" in report.problems["mask values out of range"][0]

    # convert writes the missing trainIds beside the labelIds; the fully missing mask stays an error
    result = runner.invoke(app, ["data", "convert"])
    assert result.exception is not None and "neither file" in str(result.exception)
    missing.with_name(missing.name.replace("labelTrainIds", "labelIds")).write_bytes(
        masks[3].with_name(masks[3].name.replace("labelTrainIds", "labelIds")).read_bytes())
    result = runner.invoke(app, ["data", "convert"], terminal_width=200)
    assert result.exit_code == 0 and "2 trainIds masks written" in " ".join(result.output.split()), result.output
    label_ids = np.array(Image.open(masks[0].with_name(masks[0].name.replace("labelTrainIds", "labelIds"))))
    assert (np.array(Image.open(masks[0])) == to_train_ids(label_ids)).all()
    png(masks[1], np.zeros(SIZE))
    assert check_dataset(dataset, n_jobs=1).ok


def test_coco_preset_reads_unimatch_layout(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    root = tmp_path / "data" / "coco"
    lines = {"train2017": [], "val2017": []}
    for split, count in (("train2017", 6), ("val2017", 2)):
        for i in range(count):
            stem = f"{(1000 if split == 'val2017' else 0) + i:012d}"
            root.joinpath(split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / split / f"{stem}.jpg")
            mask = rng.integers(0, 81, (20, 24))
            mask[0] = 255
            png(root / "masks" / f"{stem}.png", mask)
            lines[split].append(f"{split}/{stem}.jpg masks/{stem}.png")
    splits = tmp_path / "data" / "splits" / "coco"
    (splits / "1_512").mkdir(parents=True)
    (splits / "1_512" / "labeled.txt").write_text("\n".join(lines["train2017"][:2]) + "\n")
    (splits / "1_512" / "unlabeled.txt").write_text("\n".join(lines["train2017"][2:]) + "\n")
    (splits / "val.txt").write_text("\n".join(lines["val2017"]) + "\n")
    monkeypatch.chdir(tmp_path)
    assert CliRunner().invoke(app, ["config", "init", "coco-1_512"]).exit_code == 0
    result = CliRunner().invoke(app, ["data", "check"], terminal_width=200)
    assert result.exit_code == 0 and "2 labeled, 4 unlabeled, 2 val; 81 classes" in " ".join(result.output.split())
    dataset = Dataset(cfg.load(None))
    _, mask = dataset.load(dataset.split("val")[0])
    assert mask.max() == 255 and (mask[mask != 255] <= 80).all()


@pytest.mark.parametrize("preset", [f"cityscapes-1_{n}" for n in (30, 16, 8, 4, 2)] +
                         [f"coco-1_{n}" for n in (512, 256, 128, 64, 32)])
def test_every_unimatch_split_has_a_preset(preset):
    config = cfg.parse(cfg.PRESETS[preset], PROJECT_ROOT, preset)
    name, split = preset.split("-")
    assert config.labeled.as_posix().endswith(f"data/splits/{name}/{split}/labeled.txt")
    assert config.val.as_posix().endswith(f"data/splits/{name}/val.txt")


def test_recipes_and_prompts_of_both():
    name, recipe = get_recipe(None, "cityscapes")
    assert name == "cityscapes-r101" and recipe.crop == 801 and recipe.eval_mode == "sliding"
    name, recipe = get_recipe(None, "coco")
    assert name == "coco-r101" and recipe.crop == 513
    assert prompts_for("vegetation") == ("vegetation", "tree") and prompts_for("hair drier") == ("hair dryer",)
    assert prompts_for("road") == ("road",)
