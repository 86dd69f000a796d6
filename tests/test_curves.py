"""TensorBoard curves of a run, read back with TensorBoard's own reader."""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import fresh
from pipeline.data.datasets import Dataset
from test_trainer import TINY
from trainer.stages import train_stage

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader  # noqa: E402

QUIET = {"log": lambda *_: None}


def read(run_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def series(events: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in events.Scalars(tag)]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_both_stages_write_loss_lambda_lr_speed_val_scores_and_pictures(toy_world, calibrated, tmp_path):
    config = fresh(toy_world, calibrated, tmp_path)
    one = Path(train_stage(config, "t", TINY, 1, name="run", **QUIET)["run_dir"])
    two = Path(train_stage(config, "t", TINY, 2, name="run", **QUIET)["run_dir"])
    first, second = read(one), read(two)
    lines = metrics(one)
    steps = lines[-1]["step"]
    assert [s for s, _ in series(first, "loss/total")] == list(range(1, steps + 1))
    for tag in ("loss/supervised", "loss/unsupervised", "schedule/lambda", "schedule/lr"):
        assert len(series(first, tag)) == steps, tag
    assert series(first, "val/miou") == [(x["step"], pytest.approx(x["miou"])) for x in lines]
    assert [v for _, v in series(first, "speed/images_per_s")] == pytest.approx([x["images_per_s"] for x in lines])
    iou_tags = {t for t in first.Tags()["scalars"] if t.startswith("val_iou/")}
    scored = {f"val_iou/{name}" for name, iou in zip(Dataset(config).classes, lines[-1]["iou"]) if iou is not None}
    assert iou_tags == scored and scored
    picture = first.Images("val/0")[-1]
    assert picture.step == steps and picture.width == 3 * picture.height + 8  # image | prediction | truth, 4 px gaps
    # stage II continues stage I's x axis
    assert series(second, "loss/total")[0][0] == steps + 1
    assert series(second, "val/miou")[-1][0] == metrics(two)[-1]["step"] + steps


def test_a_resumed_run_shows_every_step_once_with_the_uninterrupted_values(toy_world, calibrated, tmp_path):
    config = fresh(toy_world, calibrated, tmp_path)
    recipe = replace(TINY, epochs=(3, 1))
    straight = Path(train_stage(config, "t", recipe, 1, name="straight", deterministic=True, **QUIET)["run_dir"])

    saved = tmp_path / "after-epoch-1.pt"

    def keep_first(record):
        if record["epoch"] == 1:
            shutil.copy(run / "last.pt", saved)

    run = Path(config.work_dir / "runs" / "killed" / "stage1")
    train_stage(config, "t", recipe, 1, name="killed", deterministic=True, on_epoch=keep_first, **QUIET)
    # as if killed after epochs 2 and 3 logged their steps but before their checkpoints were written
    shutil.copy(saved, run / "last.pt")
    logged = sum(1 for f in run.glob("events.out.tfevents.*") for e in EventFileLoader(str(f)).Load()
                 if any(v.tag == "loss/total" for v in e.summary.value))
    train_stage(config, "t", recipe, 1, name="killed", resume=True, deterministic=True, **QUIET)

    steps = metrics(straight)[-1]["step"]
    resumed, reference = read(run), read(straight)
    assert logged == steps  # the orphaned steps were on disk ...
    for tag in ("loss/total", "schedule/lr", "val/miou"):  # ... and are shown once, with the resumed values
        got, want = series(resumed, tag), series(reference, tag)
        assert [s for s, _ in got] == [s for s, _ in want], tag
        assert [v for _, v in got] == pytest.approx([v for _, v in want]), tag
    assert [s for s, _ in series(resumed, "loss/total")] == list(range(1, steps + 1))


def test_without_tensorboard_one_line_says_how_and_training_goes_on(toy_world, calibrated, tmp_path, monkeypatch):
    from trainer.curves import Curves

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as when not installed
    monkeypatch.setattr(Curves, "hinted", False)
    config = fresh(toy_world, calibrated, tmp_path)
    said = []
    result = train_stage(config, "t", replace(TINY, epochs=(1, 1)), 1, name="plain", log=said.append)
    assert result["best"] is not None
    train_stage(config, "t", replace(TINY, epochs=(1, 1)), 2, name="plain", log=said.append)  # as --stage all
    hints = [line for line in said if "TensorBoard" in line]
    assert len(hints) == 1 and "pip install 'conformalsam[tensorboard]'" in hints[0]
    assert not list(Path(result["run_dir"]).glob("events.out.tfevents.*"))
