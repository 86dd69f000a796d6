"""Stage 1 end to end on a small toy world: thresholds from the store, masks on disk, reuse, safety, the CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cli import app
from conftest import ANNOTATOR, work_copy
from pipeline import PROJECT_ROOT
from pipeline.stage1.calibrate import Settings, filtered_mask, run_calibrate
from pipeline.stage1.conformal import Upsampler, background_index, grid_values, prediction_sets, pseudo_label, to_bins
from pipeline.data.datasets import Dataset
from pipeline.errors import UserError
from pipeline.stage0.store import LogitsStore

TESTS = Path(__file__).resolve().parent


def fresh(toy_world, scored, tmp_path):
    return work_copy(toy_world, scored, tmp_path)


def full_probabilities(store: LogitsStore, image_id: str) -> torch.Tensor:
    probs = store.probabilities(image_id)
    return Upsampler(probs.shape[1:], store.image_size(image_id)).full(probs)


def brute_force_qhat(config, alpha_k) -> tuple[float, int]:
    """Every labeled pixel's score at full resolution, concatenated, sorted: the k-th."""
    dataset, store = Dataset(config), LogitsStore(config.work_dir / "logits.zarr")
    scores = []
    for sample in dataset.split("labeled"):
        p = full_probabilities(store, sample.id)
        mask = torch.from_numpy(dataset.read_mask(sample.mask)).long()
        valid = mask != 255
        scores.append(1 - p.gather(0, mask.clamp_max(p.shape[0] - 1)[None])[0][valid])
    scores = grid_values()[to_bins(torch.cat(scores).clamp(0, 1))]
    n = scores.numel()
    k = alpha_k(n)
    return torch.sort(scores).values[k - 1].item(), n


def test_paper_mode_threshold_and_masks_match_brute_force(toy_world, scored, tmp_path):
    config = fresh(toy_world, scored, tmp_path)
    record = run_calibrate(config, Settings(alpha=0.1), jobs=2)
    qhat, n = brute_force_qhat(config, lambda n: -(-(n + 1) * 9 // 10))
    assert record["qhat"] == qhat and record["rank"]["n"] == n
    assert sum(record["n_pixels"].values()) == n

    dataset, store = Dataset(config), LogitsStore(config.work_dir / "logits.zarr")
    unlabeled = dataset.split("unlabeled")
    pngs = sorted((config.work_dir / "masks").glob("*.png"))
    assert [p.stem for p in pngs] == sorted(s.id for s in unlabeled)
    q = torch.full((dataset.num_classes,), qhat)
    right = kept = valid = raw_right = 0
    for sample in unlabeled:
        with Image.open(config.work_dir / "masks" / f"{sample.id}.png") as img:
            assert img.mode == "P" and img.size[::-1] == store.image_size(sample.id)
            mask = np.asarray(img)
        assert set(np.unique(mask)) <= set(range(dataset.num_classes)) | {255}
        p = full_probabilities(store, sample.id)
        expected = pseudo_label(p, prediction_sets(p, q), "paper", background_index(dataset.classes))
        np.testing.assert_array_equal(mask, expected.numpy(), err_msg=sample.id)
        truth = dataset.read_mask(sample.mask)
        on = (truth != 255) & (mask != 255)
        right, kept, valid = right + (mask == truth)[on].sum(), kept + on.sum(), valid + (truth != 255).sum()
        raw_right += (p.argmax(0).numpy() == truth)[truth != 255].sum()

    saved = json.loads((config.work_dir / "calibration.json").read_text())
    for key in ("alpha", "mode", "rule", "qhat", "n_images", "n_pixels", "fallbacks", "store", "diagnostics"):
        assert key in saved
    assert saved["n_images"] == len(dataset.split("labeled"))
    assert len(saved["store"]["checksum"]) == 64
    cross = saved["diagnostics"]["cross_calibration"]
    assert 0.5 < cross["pixel_coverage"] <= 1 and cross["folds"] == 5
    unl = saved["diagnostics"]["unlabeled"]
    assert unl["images"] == len(unlabeled) and sum(unl["set_size_histogram"]) == unl["pixels"]
    quality = unl["quality"]  # the toy world's unlabeled split has ground truth
    assert quality["filtered_kept"]["pixel_accuracy"] == pytest.approx(right / kept)
    assert quality["filtered_overall"]["pixel_accuracy"] == pytest.approx(right / valid)
    assert quality["raw"]["pixel_accuracy"] == pytest.approx(raw_right / valid)


@pytest.mark.parametrize("mode", ["mondrian", "crc"])
def test_other_modes_write_their_thresholds(toy_world, scored, tmp_path, mode):
    config = fresh(toy_world, scored, tmp_path)
    record = run_calibrate(config, Settings(alpha=0.2, mode=mode, rule="singleton"), jobs=1)
    classes = Dataset(config).classes
    if mode == "mondrian":
        assert set(record["qhat"]) == set(classes)
        assert set(record["per_class_rank"]) == set(classes)
        for name, rank in record["per_class_rank"].items():
            fallback = rank["k"] > rank["n"]
            assert fallback == (name in record["fallbacks"])
            assert not fallback or record["qhat"][name] == record["pooled_qhat"]
    else:
        assert isinstance(record["qhat"], float) and record["rank"] is None
        assert record["diagnostics"]["cross_calibration"]["image_coverage"] is not None
    sets = record["diagnostics"]["unlabeled"]["set_size_histogram"]
    kept = record["diagnostics"]["unlabeled"]["kept_fraction"]
    assert kept == pytest.approx(sets[1] / sum(sets))  # singleton: exactly the one-class sets are kept


def test_rerun_is_a_no_op_and_new_settings_rewrite(toy_world, scored, tmp_path):
    config = fresh(toy_world, scored, tmp_path)
    first = run_calibrate(config, Settings(alpha=0.1), jobs=1)
    assert not first["unchanged"]
    masks = config.work_dir / "masks"
    stamps = {p.name: p.stat().st_mtime_ns for p in masks.iterdir()}
    again = run_calibrate(config, Settings(alpha=0.1), jobs=1)
    assert again["unchanged"] and again["key"] == first["key"]
    assert {p.name: p.stat().st_mtime_ns for p in masks.iterdir()} == stamps
    assert run_calibrate(config, Settings(alpha=0.1), write_masks=False, jobs=1)["unchanged"]

    other = run_calibrate(config, Settings(alpha=0.3), jobs=1)
    assert not other["unchanged"] and other["qhat"] < first["qhat"]
    assert json.loads((config.work_dir / "calibration.json").read_text())["alpha"] == 0.3
    assert (masks / ".key").read_text().strip() == other["masks"]["key"]
    assert not list(config.work_dir.glob(".masks-*"))  # staging moved into place

    (masks / pngs_of(masks)[0]).unlink()  # a deleted mask is noticed and rewritten
    assert not run_calibrate(config, Settings(alpha=0.3), jobs=1)["unchanged"]
    assert len(pngs_of(masks)) == sum(name.endswith(".png") for name in stamps)  # every PNG again

    # a changed labeled mask changes the fit's key
    sample = Dataset(config).split("labeled")[0]
    stat = sample.mask.stat()
    os.utime(sample.mask, ns=(time.time_ns(), time.time_ns()))
    try:
        assert not run_calibrate(config, Settings(alpha=0.3), jobs=1)["unchanged"]
    finally:  # the toy world is shared by the session's tests: the other fits must stay valid
        os.utime(sample.mask, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def pngs_of(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.png"))


def test_banded_mask_equals_whole_image(scored):
    store = LogitsStore(scored / "logits.zarr")
    q = torch.linspace(0.3, 0.9, 8)
    for image_id in store.ids()[:5]:
        whole = filtered_mask(store, image_id, q, "paper", 0)
        for band in (1, 8 * 32 * 3, 8 * 32 * 7):  # one row, three rows, seven rows per band
            for a, b in zip(whole, filtered_mask(store, image_id, q, "paper", 0, band_elements=band)):
                assert torch.equal(a, b)


def test_no_masks_fits_and_reports_only(toy_world, scored, tmp_path):
    config = fresh(toy_world, scored, tmp_path)
    record = run_calibrate(config, Settings(alpha=0.1), write_masks=False)
    assert record["masks"] is None and "unlabeled" not in record["diagnostics"] and not record["saved"]
    assert not (config.work_dir / "masks").exists() and not (config.work_dir / "calibration.json").exists()
    full = run_calibrate(config, Settings(alpha=0.1), jobs=1)
    before = {p: p.read_bytes() for p in config.work_dir.rglob("*") if p.is_file() and "logits.zarr" not in p.parts}
    other = run_calibrate(config, Settings(alpha=0.3), write_masks=False)  # another fit, reported only
    assert other["qhat"] != full["qhat"] and not other["saved"]
    after = {p: p.read_bytes() for p in config.work_dir.rglob("*") if p.is_file() and "logits.zarr" not in p.parts}
    assert after == before  # the record and its masks are untouched


def test_missing_scores_and_bad_settings_are_clear_errors(toy_world, scored, tmp_path):
    config = fresh(toy_world, scored, tmp_path)
    victim = Dataset(config).split("unlabeled")[3].id
    shutil.rmtree(config.work_dir / "logits.zarr" / "scores" / victim)
    with pytest.raises(UserError, match="logits --split unlabeled"):
        run_calibrate(config, Settings())
    assert run_calibrate(config, Settings(), write_masks=False)["masks"] is None  # the fit needs labeled only
    with pytest.raises(UserError, match="--mode"):
        run_calibrate(config, Settings(mode="pooled"))
    with pytest.raises(UserError, match="--alpha"):
        run_calibrate(config, Settings(alpha=1.5))
    with pytest.raises(UserError, match="crc mode has 16 labeled images"):
        run_calibrate(config, Settings(alpha=0.05, mode="crc"), write_masks=False)
    with pytest.raises(UserError, match="no score store"):
        run_calibrate(replace(config, work_dir=tmp_path / "empty"), Settings())


SLOW_WRITER = """
import io, sys, time
from dataclasses import replace
from pathlib import Path
from PIL import Image

real = Image.Image.save
def slow(self, fp, format=None, **kw):  # writes half, pauses, writes the rest: a kill can land mid-file
    buf = io.BytesIO()
    real(self, buf, format=format, **kw)
    data = buf.getvalue()
    with open(fp, "wb") as f:
        f.write(data[: len(data) // 2]); f.flush(); time.sleep(0.04); f.write(data[len(data) // 2:])
Image.Image.save = slow

sys.path[:0] = [sys.argv[1], sys.argv[2]]
from conftest import toy_config
from pipeline.stage1.calibrate import Settings, filtered_mask, run_calibrate
config = replace(toy_config(Path(sys.argv[3])), weights=Path(sys.argv[4]), work_dir=Path(sys.argv[5]))
run_calibrate(config, Settings(alpha=float(sys.argv[6])), jobs=1)
"""


def test_killed_mask_writing_leaves_no_partial_png_and_resumes(toy_world, scored, tmp_path):
    config = fresh(toy_world, scored, tmp_path)
    reference = fresh(toy_world, scored, tmp_path / "ref")
    run_calibrate(reference, Settings(alpha=0.2), jobs=1)
    before = run_calibrate(config, Settings(alpha=0.1), jobs=1)  # an earlier calibration must survive the kill
    old_json = (config.work_dir / "calibration.json").read_bytes()

    args = [sys.executable, "-c", SLOW_WRITER, str(TESTS), str(PROJECT_ROOT), str(toy_world), str(ANNOTATOR),
            str(config.work_dir), "0.2"]
    proc = subprocess.Popen(args)
    deadline = time.time() + 60
    staged = []
    while time.time() < deadline and len(staged) < 6 and proc.poll() is None:
        staged = [p for d in config.work_dir.glob(".masks-*") for p in d.glob("*.png")]
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(staged) >= 6, "the slow writer finished or never started"

    # nothing already written was damaged: the earlier calibration and its masks are intact
    assert (config.work_dir / "calibration.json").read_bytes() == old_json
    assert (config.work_dir / "masks" / ".key").read_text().strip() == before["masks"]["key"]
    # every PNG under its final name is complete (partial bytes only ever live under a hidden temp name)
    for png in (p for d in config.work_dir.glob(".masks-*") for p in d.glob("*.png")):
        with Image.open(png) as img:
            img.load()
        ref = reference.work_dir / "masks" / png.name
        np.testing.assert_array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(ref)))

    record = run_calibrate(config, Settings(alpha=0.2), jobs=1)  # resumes in the staging folder
    assert not list(config.work_dir.glob(".masks-*")) and not list((config.work_dir / "masks").glob(".*.tmp"))
    for ref in (reference.work_dir / "masks").glob("*.png"):
        np.testing.assert_array_equal(np.asarray(Image.open(config.work_dir / "masks" / ref.name)),
                                      np.asarray(Image.open(ref)), err_msg=ref.name)
    assert record["diagnostics"]["unlabeled"] == json.loads(
        (reference.work_dir / "calibration.json").read_text())["diagnostics"]["unlabeled"]


def test_cli_calibrate_prints_report_and_rejects_bad_flags(toy_world, scored, tmp_path):
    config = fresh(toy_world, scored, tmp_path)
    flags = ["--config", "toy", "--root", str(config.root), "--labeled", str(config.labeled), "--unlabeled",
             str(config.unlabeled), "--work-dir", str(config.work_dir)]
    result = CliRunner().invoke(app, ["calibrate", "--alpha", "0.1", *flags], terminal_width=120)
    assert result.exit_code == 0, result.output
    assert "qhat" in result.output and "pseudo-label quality" in result.output
    result = CliRunner().invoke(app, ["calibrate", "--alpha", "0.1", *flags], terminal_width=120)
    assert "nothing to do" in result.output
    result = CliRunner().invoke(app, ["calibrate", "--rule", "widest", *flags])
    assert isinstance(result.exception, UserError) and "--rule" in str(result.exception)


def test_inspect_writes_contact_sheets_and_the_sweep(toy_world, scored, tmp_path):
    config = fresh(toy_world, scored, tmp_path)
    flags = ["--config", "toy", "--root", str(config.root), "--labeled", str(config.labeled), "--unlabeled",
             str(config.unlabeled), "--work-dir", str(config.work_dir)]
    result = CliRunner().invoke(app, ["inspect", *flags])
    assert isinstance(result.exception, UserError) and "calibrate" in str(result.exception)
    run_calibrate(config, Settings(alpha=0.1), jobs=1)
    result = CliRunner().invoke(app, ["inspect", "--count", "3", *flags], terminal_width=120)
    assert result.exit_code == 0, result.output
    sheets = sorted((config.work_dir / "inspect" / "sheets").glob("train_*.png"))
    assert len(sheets) == 3
    with Image.open(sheets[0]) as img:
        assert img.mode == "RGB" and img.height >= 256 and img.width > 4 * 256  # 4 tiles: no checkpoint given
    with Image.open(config.work_dir / "inspect" / "alpha-sweep.png") as img:
        assert img.width > 600 and img.height > 600  # three panels
    page = (config.work_dir / "inspect" / "index.html").read_text()
    assert "Val images: the val list" in page or "Val images: none scored" in page  # no --val: the preset's list
    result = CliRunner().invoke(app, ["inspect", "--ids", "nope", *flags])
    assert isinstance(result.exception, UserError) and "nope" in str(result.exception)


def test_a_killed_runs_staging_folder_is_removed_by_the_next_calibrate_even_with_nothing_to_do(toy_world,
                                                                                               calibrated, tmp_path):
    from conftest import fresh

    config = fresh(toy_world, calibrated, tmp_path)
    stale = config.work_dir / ".masks-0123456789abcdef"  # what a calibrate killed in its masks pass leaves
    stale.mkdir()
    (stale / "train_00001.png").write_bytes(b"partial")
    masks = {p.name: p.read_bytes() for p in (config.work_dir / "masks").iterdir()}
    again = run_calibrate(config, Settings(alpha=0.1), jobs=1)  # the same fit: nothing to write
    assert again["unchanged"], {k: again.get(k) for k in ("repaired", "alpha", "rule", "mode")}
    assert not stale.exists()
    assert {p.name: p.read_bytes() for p in (config.work_dir / "masks").iterdir()} == masks
    stale.mkdir()
    run_calibrate(config, Settings(alpha=0.1), write_masks=False, jobs=1)  # fit and report only: writes nothing
    assert stale.exists()


def test_more_folds_than_labeled_images_is_leave_one_out_and_says_so(toy_world, scored, tmp_path):
    from conftest import work_copy

    config = work_copy(toy_world, scored, tmp_path)
    ten = tmp_path / "ten.txt"
    ten.write_text("".join(Path(config.labeled).read_text().splitlines(keepends=True)[:10]))
    config = replace(config, labeled=ten)
    warnings = []
    record = run_calibrate(config, Settings(alpha=0.1, folds=50), write_masks=False, jobs=1, warn=warnings.append)
    assert any("--folds 50: 10 labeled images make at most 10 folds" in w and "leave-one-out" in w for w in warnings)
    assert record["diagnostics"]["cross_calibration"]["folds"] == 10
