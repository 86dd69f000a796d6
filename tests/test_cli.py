"""Every command's help renders; config commands behave."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from cli import app
from pipeline import config as cfg
from pipeline.errors import UserError

COMMANDS = [[], ["logits"], ["calibrate"], ["train"], ["eval"], ["export"], ["inspect"], ["summary"], ["data"],
            ["data", "check"], ["data", "split"], ["data", "list"], ["data", "convert"], ["config"], ["config", "show"],
            ["config", "init"], ["toy"], ["toy", "generate"], ["toy", "train-annotator"], ["toy", "evaluate"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "top")
def test_help(command):
    result = CliRunner().invoke(app, [*command, "--help"], terminal_width=200)
    assert result.exit_code == 0 and "Usage" in result.output
    usage = next(line for line in result.output.splitlines() if "Usage" in line)
    assert "{" not in usage, usage  # arguments as NAME, not typer's {name}


def test_config_help_names_every_preset():
    result = CliRunner().invoke(app, ["logits", "--help"], terminal_width=400)
    text = " ".join(result.output.split())
    for family in {name.split("-")[0] for name in cfg.PRESETS}:
        assert f"{family}" in text.split("TOML config file or preset name")[1].split("Default")[0], family


def test_config_init_writes_preset_and_refuses_overwrite(tmp_path):
    out = tmp_path / "conformalsam.toml"
    assert CliRunner().invoke(app, ["config", "init", "voc-92", "--out", str(out)]).exit_code == 0
    assert cfg.load(out).format == "voc"
    result = CliRunner().invoke(app, ["config", "init", "toy", "--out", str(out)])
    assert isinstance(result.exception, UserError) and "--force" in str(result.exception)
    assert cfg.load(out).format == "voc"  # untouched
    assert CliRunner().invoke(app, ["config", "init", "toy", "--out", str(out), "--force"]).exit_code == 0
    assert cfg.load(out).format == "folder"


def test_config_show_applies_flags(tmp_path):
    result = CliRunner().invoke(app, ["config", "show", "--config", "voc-92", "--backend", "clipseg"])
    assert result.exit_code == 0 and 'backend = "clipseg"' in result.stdout
