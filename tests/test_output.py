"""Results on stdout (a script or `> file` gets them), progress and messages on stderr; off a terminal nothing
wraps, whatever COLUMNS says: a path or a table row stays on its line."""

from __future__ import annotations

import sys
from dataclasses import replace

import pytest

import cli
from conftest import fresh, toy_flags
from test_trainer import TINY
from trainer.stages import train_stage


def run(monkeypatch, capsys, *args) -> tuple[str, str]:
    monkeypatch.setattr(sys, "argv", ["conformalsam", *map(str, args)])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    got = capsys.readouterr()
    assert exit_.value.code == 0, got.err
    return got.out, got.err


@pytest.mark.parametrize("columns", [None, "80", "200"])
def test_results_go_to_stdout_whole_lines_at_any_columns(toy_world, calibrated, tmp_path, monkeypatch, capsys,
                                                         columns):
    deep = tmp_path / ("a-folder-name-long-enough-to-wrap-" * 3) / "experiment"
    deep.mkdir(parents=True)
    config = fresh(toy_world, calibrated, deep)
    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", columns)
    train_stage(config, "t", replace(TINY, epochs=(1, 1)), 1, name="run", log=lambda *_: None)
    best = config.work_dir / "runs" / "run" / "stage1" / "best.pt"

    out, err = run(monkeypatch, capsys, "eval", "--checkpoint", best, *toy_flags(config))
    assert f"{best} (stage 1, epoch 1) on the 6 images of {config.val}, whole" in out.splitlines()
    assert "mIoU " in out and "pixel accuracy" in out and "IoU %" in out
    assert "IoU %" not in err and "mIoU" not in err

    out, err = run(monkeypatch, capsys, "calibrate", "--alpha", "0.2", *toy_flags(config))
    assert "cross-calibration" in out and "cross-calibration" not in err
    assert any(line.startswith(f"wrote {config.work_dir / 'calibration.json'} and ") for line in err.splitlines())

    out, err = run(monkeypatch, capsys, "summary", "--work-dir", str(config.work_dir))
    assert "pseudo-labels:" in out and err == ""
    assert "conformal-filtered, ignore = miss" in out  # all pixels, as raw is: the three of calibrate's report

    out, err = run(monkeypatch, capsys, "data", "check", *toy_flags(config)[:-2])  # (no --work-dir: reads data only)
    assert f"folder data set at {config.root}: " in out and "no problems found" in out
    for line in (out + err).splitlines():  # nothing cut a path in two
        assert not line.startswith(("-folder", "experiment", "/work")), line
