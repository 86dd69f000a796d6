"""Planted faults a new user hits: each ends in one line naming the file or flag and the fix, exit code 2,
no traceback, nothing already written changed."""

from __future__ import annotations

import os
import sys

import pytest
import torch

import cli
from conftest import fresh
from test_trainer import TINY
from trainer.models import build_model, load_backbone
from trainer.recipes import get_recipe
from trainer.stages import train_stage


def run_cli(monkeypatch, capsys, *args) -> str:
    """The installed entry point on these arguments: returns its one line of error (exit code 2)."""
    monkeypatch.setattr(sys, "argv", ["conformalsam", *map(str, args)])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def flags(config):
    return ["--root", config.root, "--labeled", config.labeled, "--unlabeled", config.unlabeled, "--val",
            config.val, "--work-dir", config.work_dir, "--format", "folder"]


def test_eval_refuses_bad_splits_and_files_that_are_no_trainer_checkpoints(toy_world, calibrated, tmp_path,
                                                                          monkeypatch, capsys):
    config = fresh(toy_world, calibrated, tmp_path)
    ckpt = tmp_path / "x.pt"
    torch.save({"a": torch.zeros(1)}, ckpt)
    err = run_cli(monkeypatch, capsys, "eval", "--checkpoint", ckpt, "--split", "bogus", *flags(config))
    assert "--split bogus: choose one of labeled, unlabeled, val" in err
    err = run_cli(monkeypatch, capsys, "eval", "--checkpoint", ckpt, *flags(config))
    assert f"{ckpt}: not a checkpoint of `conformalsam train`" in err and "last.pt or best.pt" in err
    ckpt.write_bytes(os.urandom(4000))
    err = run_cli(monkeypatch, capsys, "eval", "--checkpoint", ckpt, *flags(config))
    assert "cannot be read as a checkpoint (damaged, or not a PyTorch file of tensors)" in err
    assert "weights_only" not in err


def test_random_bytes_as_backbone_weights(tmp_path):
    path = tmp_path / "resnet.pth"
    path.write_bytes(os.urandom(3000))
    with pytest.raises(cli.UserError, match=r"cannot be read as backbone weights \(damaged, or not a PyTorch file"):
        load_backbone(build_model("deeplabv3plus-tiny", 3), path)


@pytest.mark.parametrize("flag,value", [("lr", "nan"), ("lr", "-1"), ("lr", "0"), ("weight_decay", "inf"),
                                        ("head_lr_mult", "nan"), ("momentum", "-0.5")])
def test_non_finite_or_non_positive_numbers_are_refused(flag, value):
    with pytest.raises(cli.UserError, match=f"--{flag.replace('_', '-')} {float(value)}: must be a finite number"):
        get_recipe("toy", "folder", **{flag: float(value)})


def test_training_checks_its_output_folder_and_epochs_before_any_work(toy_world, calibrated, tmp_path,
                                                                      monkeypatch, capsys):
    config = fresh(toy_world, calibrated, tmp_path)
    err = run_cli(monkeypatch, capsys, "train", "--stage", "1", "--epochs", "0", "--crop", "32", *flags(config))
    assert "--epochs 0: stage 1 needs at least 1 epoch" in err
    assert not (config.work_dir / "runs").exists()  # nothing created
    (config.work_dir / "runs" / "t").mkdir(parents=True)
    (config.work_dir / "runs" / "t" / "stage1").write_text("a file where the run folder goes")
    spent = []
    with pytest.raises(cli.UserError, match="runs/t/stage1: cannot write there.*choose another --work-dir"):
        train_stage(config, "t", TINY, 1, name="t", on_epoch=spent.append)
    assert not spent  # refused before the first epoch


def test_square_brackets_survive_in_error_lines(toy_world, calibrated, tmp_path, monkeypatch, capsys):
    config = fresh(toy_world, calibrated, tmp_path)
    odd = tmp_path / "x [y]" / "best.pt"
    err = run_cli(monkeypatch, capsys, "eval", "--checkpoint", odd, *flags(config))
    assert f"{odd}: not found" in err
