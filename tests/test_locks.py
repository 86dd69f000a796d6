"""Concurrent commands on one work folder: one writer per output, readers shared, a killed holder never blocks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from conftest import fresh, toy_flags
from pipeline import PROJECT_ROOT
from pipeline.stage1.calibrate import Settings, run_calibrate
from pipeline.errors import UserError
from pipeline.locks import hold
from test_trainer import TINY
from trainer.stages import train_stage

HOLDER = """
import sys, time
sys.path.insert(0, sys.argv[1])
from pipeline.locks import hold
with hold(sys.argv[2], sys.argv[3], exclusive=sys.argv[4].split(",") if sys.argv[4] else [],
          shared=sys.argv[5].split(",") if sys.argv[5] else []):
    print("held", flush=True)
    time.sleep(600)
"""


def holder(work, command, exclusive="", shared=""):
    """A process holding locks of ``work`` until it is killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(PROJECT_ROOT), str(work), command, exclusive, shared],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def cli(config, *args):
    return subprocess.run([sys.executable, str(PROJECT_ROOT / "cli.py"), *args, *toy_flags(config)],
                          capture_output=True, text=True, timeout=300)


def refused(result, *words):
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line, line
    for word in words:
        assert word in line, line
    return line


def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_holder_never_blocks(toy_world, calibrated,
                                                                                        tmp_path):
    config = fresh(toy_world, calibrated, tmp_path)
    before = {p: p.stat().st_mtime_ns for p in config.work_dir.rglob("*") if p.is_file()}
    proc = holder(config.work_dir, "calibrate", exclusive="masks", shared="scores")
    try:
        line = refused(cli(config, "calibrate", "--alpha", "0.2"), "calibrate (pid", str(proc.pid),
                       "calibration.json and masks/", "another --work-dir")
        assert "since" in line
        refused(cli(config, "train", "--stage", "1", "--epochs", "1"), "calibrate (pid")  # reads the masks
        refused(cli(config, "logits", "--split", "labeled", "--force"), "the score store")  # calibrate reads it
        with pytest.raises(UserError, match="calibrate"):
            train_stage(config, "t", TINY, 1, name="run")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    after = {p: p.stat().st_mtime_ns for p in config.work_dir.rglob("*") if p.is_file() and ".locks" not in p.parts}
    assert after == {p: t for p, t in before.items() if ".locks" not in p.parts}  # nothing was touched
    # killed with kill -9: its lock went with it; its note is cleared by the next holder
    record = run_calibrate(config, Settings(alpha=0.2), jobs=1)
    assert record["alpha"] == 0.2
    assert not list((config.work_dir / ".locks").glob("*.json"))


def test_readers_share_and_each_run_has_its_own_lock(toy_world, calibrated, tmp_path):
    config = fresh(toy_world, calibrated, tmp_path)
    quiet = dict(log=lambda *_: None)
    proc = holder(config.work_dir, "train", exclusive="runs--busy--stage1", shared="masks")
    try:
        assert train_stage(config, "t", TINY, 1, name="other", **quiet)["best"] is not None  # masks are shared
        with pytest.raises(UserError, match=r"train \(pid .* is using runs/busy/stage1.*another --name"):
            train_stage(config, "t", TINY, 1, name="busy", **quiet)
        with pytest.raises(UserError, match="train .* is using calibration.json and masks/"):
            run_calibrate(config, Settings(alpha=0.2), jobs=1)
        run_calibrate(config, Settings(alpha=0.1), write_masks=False, jobs=1)  # fit and report only: a reader
    finally:
        proc.kill()
        proc.wait()


def test_the_commands_hold_their_locks_while_they_work(toy_world, calibrated, tmp_path, monkeypatch):
    """While calibrate runs (inside its first pass), a calibrate in another process is refused."""
    import pipeline.stage1.calibrate as calibrate

    config = fresh(toy_world, calibrated, tmp_path)
    seen = []
    real = calibrate.accumulate

    def accumulate(*args, **kwargs):
        seen.append(cli(config, "calibrate", "--alpha", "0.3"))
        return real(*args, **kwargs)

    monkeypatch.setattr(calibrate, "accumulate", accumulate)
    run_calibrate(config, Settings(alpha=0.2), jobs=1)
    refused(seen[0], f"calibrate (pid {os.getpid()}")
