"""Shared fixtures: small generated data sets in each format (nothing downloaded)."""

from __future__ import annotations

import os
import tempfile

# No test reaches a network or a model cache: huggingface_hub reads these once, when first imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="conformalsam-empty-hf-")

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.toy import SHIPPED_ANNOTATOR
from pipeline.config import Config
from pipeline.toy.world import WorldSpec, generate


def write_image(path: Path, rng: np.random.Generator, size=(24, 32)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path, quality=95)


def write_gray_png(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8)).save(path)  # 2-D uint8: mode L


def make_config(root: Path, fmt: str, labeled: Path, unlabeled: Path, val: Path | None = None, classes=None) -> Config:
    return Config(format=fmt, root=root, labeled=labeled, unlabeled=unlabeled, val=val, classes=classes,
                  backend="toy", weights=None, work_dir=root / "work", source="test")


def backend_config(backend: str, weights: Path | None, **changes) -> Config:
    """A config naming a backend (for building it directly; the data paths are never read)."""
    return replace(make_config(Path("/nonexistent"), "folder", Path("l.txt"), Path("u.txt")), backend=backend,
                   weights=weights, **changes)


@pytest.fixture(scope="session")
def toy_world(tmp_path_factory) -> Path:
    """A small toy world (70 target train, 6 val, 32x32 px), generated once per test session."""
    out = tmp_path_factory.mktemp("world") / "toy"
    generate(out, WorldSpec(train=70, val=6, source_val=4, size=32))
    return out


def toy_flags(config: Config) -> list[str]:
    """The command-line flags naming a toy config's data and work folder (the toy preset, then overrides)."""
    return ["--config", "toy", "--root", str(config.root), "--labeled", str(config.labeled), "--unlabeled",
            str(config.unlabeled), "--val", str(config.val), "--work-dir", str(config.work_dir)]


def toy_config(world: Path, labeled: int = 16) -> Config:
    return make_config(world / "target", "folder", world / "splits" / str(labeled) / "labeled.txt",
                       world / "splits" / str(labeled) / "unlabeled.txt", world / "splits" / "val.txt")


ANNOTATOR = SHIPPED_ANNOTATOR


@pytest.fixture(scope="session")
def scored(toy_world, tmp_path_factory) -> Path:
    """A work folder whose store holds the toy annotator's scores of the labeled and unlabeled splits."""
    from pipeline.stage0.logits import run_logits

    work = tmp_path_factory.mktemp("scored") / "work"
    config = replace(toy_config(toy_world), weights=ANNOTATOR, work_dir=work)
    run_logits(config, "labeled", workers=0)
    run_logits(config, "unlabeled", workers=0)
    return work


def work_copy(world: Path, work: Path, tmp_path: Path) -> Config:
    """The toy config with its own copy of a prepared work folder (tests may change it freely)."""
    mine = tmp_path / "work"
    shutil.copytree(work, mine)
    return replace(toy_config(world), weights=ANNOTATOR, work_dir=mine)


@pytest.fixture(scope="session")
def calibrated(toy_world, scored, tmp_path_factory) -> Path:
    """A work folder with scores, calibration.json and cached masks for the small toy world."""
    from pipeline.stage1.calibrate import Settings, run_calibrate

    config = work_copy(toy_world, scored, tmp_path_factory.mktemp("calibrated"))
    run_calibrate(config, Settings(alpha=0.1), jobs=1)
    return config.work_dir


def fresh(toy_world: Path, calibrated: Path, tmp_path: Path) -> Config:
    return work_copy(toy_world, calibrated, tmp_path)
