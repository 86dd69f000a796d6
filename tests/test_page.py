"""`inspect`'s outputs: the page of the masks rendered in headless Chromium, the matplotlib alpha sweep of the
calibrated mode, the training curves."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

import browser
from conftest import fresh
from pipeline.errors import UserError
from pipeline.outputs.inspect import run_inspect
from pipeline.stage1.calibrate import Settings, run_calibrate
from test_trainer import TINY
from trainer.stages import train_stage


def sweep_meta(path) -> dict:
    with Image.open(path) as img:
        return {"title": img.text["Title"], **json.loads(img.text["Description"])}


@pytest.mark.parametrize("mode,rule", [("crc", "singleton"), ("mondrian", "paper")])
def test_the_sweep_shows_the_calibrated_modes_curves_with_kept_share_and_accuracy(toy_world, calibrated, tmp_path,
                                                                                   mode, rule):
    config = fresh(toy_world, calibrated, tmp_path)
    run_calibrate(config, Settings(alpha=0.2, mode=mode, rule=rule), jobs=1)
    result = run_inspect(config, count=1, alphas=(0.1, 0.3))
    swept = result["sweep"]
    assert (swept["mode"], swept["rule"], swept["alpha"]) == (mode, rule, 0.2)
    assert [r["alpha"] for r in swept["rows"]] == [0.1, 0.2, 0.3]  # the calibrated alpha is always a point
    meta = sweep_meta(config.work_dir / "inspect" / "alpha-sweep.png")
    assert (meta["mode"], meta["rule"], meta["alpha"]) == (mode, rule, 0.2) and f"{mode} mode" in meta["title"]
    row = next(r for r in swept["rows"] if r["alpha"] == 0.2)
    held = result["record"]["diagnostics"]["held_out"]  # calibrate's own held-out figures at its alpha
    assert row["kept"] == pytest.approx(held["kept_fraction"])
    assert row["accuracy"] == pytest.approx(held["kept_accuracy"])
    coverage = result["record"]["diagnostics"]["cross_calibration"]
    assert row["coverage"] == pytest.approx(coverage["image_coverage" if mode == "crc" else "pixel_coverage"])
    if mode == "crc":  # one threshold: the unlabeled masks' kept share is known at every alpha
        kept = result["record"]["diagnostics"]["unlabeled"]["kept_fraction"]
        assert row["kept_unlabeled"] == pytest.approx(kept)
    else:  # a threshold per class: not from the pooled histograms
        assert all(r["kept_unlabeled"] is None for r in swept["rows"])
    assert json.loads((config.work_dir / "inspect" / "alpha-sweep.json").read_text()) == swept


@pytest.mark.parametrize("rule", ["paper", "singleton"])
def test_unlabeled_kept_share_from_saved_histograms_matches_a_real_calibration(toy_world, scored, tmp_path, rule):
    from pipeline.outputs.inspect import load_histograms, unlabeled_kept
    from pipeline.stage1.conformal import ScoreHistogram

    config = fresh(toy_world, scored, tmp_path)
    for alpha in (0.1, 0.3):
        record = run_calibrate(config, Settings(alpha=alpha, rule=rule), jobs=1)
        saved = load_histograms(config.work_dir / "calibration-histograms.npz")
        hist = ScoreHistogram.from_arrays(saved["counts"], saved["mass"], saved["images"])
        kept = record["diagnostics"]["unlabeled"]["kept_fraction"]
        assert unlabeled_kept(saved, hist, alpha, "paper", rule) == pytest.approx(kept)


def test_training_curves_and_summary_plot(toy_world, calibrated, tmp_path, monkeypatch, capsys):
    from typer.testing import CliRunner

    from cli import app
    from test_hardening import run_cli

    config = fresh(toy_world, calibrated, tmp_path)
    line = run_cli(monkeypatch, capsys, "summary", "--plot", "--work-dir", str(config.work_dir))
    assert "--plot: no run in" in line
    train_stage(config, "t", replace(TINY, epochs=(2, 1)), 1, name="run", log=lambda *_: None)
    train_stage(config, "t", replace(TINY, epochs=(2, 1)), 2, name="run", log=lambda *_: None)
    result = CliRunner().invoke(app, ["summary", "--plot", "--work-dir", str(config.work_dir)])
    assert result.exit_code == 0 and "training-curves.png" in result.output, result.output
    curves = config.work_dir / "inspect" / "training-curves.png"
    with Image.open(curves) as img:
        assert img.width > 400 and json.loads(img.text["Description"]) == {"runs": ["run"]}


@pytest.fixture(scope="module")
def page_work(toy_world, calibrated, tmp_path_factory):
    from pipeline.stage0.logits import run_logits

    config = fresh(toy_world, calibrated, tmp_path_factory.mktemp("page"))
    without_val = run_inspect(config, count=1)["page"].read_text()
    with pytest.raises(UserError, match=r"--split val: none of its images is scored; run `conformalsam logits --split"):
        run_inspect(config, split="val")
    assert "Val images: none scored" in without_val and "Val:" not in without_val
    run_logits(config, "val", workers=0)
    train_stage(config, "t", replace(TINY, epochs=(1, 1)), 1, name="run", log=lambda *_: None)
    stale = config.work_dir / "inspect" / "sheets" / "gone.png"  # a sheet of an earlier call
    stale.write_bytes(b"x")
    result = run_inspect(config, count=3, checkpoint=config.work_dir / "runs" / "run" / "stage1" / "best.pt")
    assert not stale.exists() and len(result["sheets"]) == 3
    return config, result


def test_the_page_shows_the_emptied_most_least_random_labeled_and_val_masks(page_work):
    config, result = page_work
    text = result["page"].read_text()
    assert "crc" not in text and "paper mode, paper rule, alpha 0.1" in text
    for heading in ("emptied most", "emptied least", "random masks", "Labeled:", "Val:", "Classes",
                    "Alpha sweep", "Training curves"):
        assert heading in text, heading
    shares = []
    for i in range(3):  # the rows of the emptiest masks, in order, with their kept share on the caption
        with Image.open(config.work_dir / "masks" / f"{_caption_id(text, f'most-{i}')}.png") as img:
            shares.append(float((np.asarray(img) != 255).mean()))
    everyone = [float((np.asarray(Image.open(p)) != 255).mean()) for p in (config.work_dir / "masks").glob("*.png")]
    assert shares == sorted(everyone)[:3]
    assert "accuracy of kept labels" in text and 'src="/' not in text and "file:" not in text  # relative links
    assert text.count("prediction: run/stage1/best.pt, epoch 1") == 2 * 5 * 3  # every row: caption and alt text
    assert all(f'href="sheets/{p.name}"' in text for p in result["sheets"])


def _caption_id(text: str, stem: str) -> str:
    """The image id on the caption of the row whose pictures are named ``stem``."""
    before = text[:text.index(f'images/{stem}-image.jpg')]
    caption = before[before.rindex('<div class="caption">') + len('<div class="caption">'):]
    return caption.split(" · ")[0]


@pytest.fixture
def need_browser():
    why = browser.missing()
    if why and browser.required():
        pytest.fail(f"CONFORMALSAM_REQUIRE_BROWSER is set but the browser is {why}")
    if why:
        pytest.skip(why)


def test_the_page_renders_in_chromium_with_every_image_loaded_wherever_the_folder_is_copied(page_work, tmp_path,
                                                                                            need_browser):
    config, result = page_work
    copy = tmp_path / "elsewhere" / "inspect"
    shutil.copytree(config.work_dir / "inspect", copy)
    with browser.chromium() as driver:
        driver.get((copy / "index.html").as_uri())
        shown = browser.images(driver)
        # 3 groups of unlabeled masks + labeled + val, 3 rows each, 5 pictures a row; the sweep and the curves
        assert len(shown) == 5 * 3 * 5 + 2
        assert all(loaded for _, loaded in shown), [src for src, loaded in shown if not loaded]
        assert driver.find_element("id", "broken").text == ""
        (copy / shown[-1][0]).unlink()  # a picture lost: the browser, and the page, say so
        driver.get((copy / "index.html").as_uri())
        assert [src for src, loaded in browser.images(driver) if not loaded] == [shown[-1][0]]
        assert "1 picture(s) did not load" in driver.find_element("id", "broken").text
