"""The built wheel, installed without editable mode into a fresh environment, holds every module and runs the toy
world's pipeline from any folder without writing into site-packages."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from pipeline import PROJECT_ROOT

PACKAGES = ("pipeline", "trainer")


def source_modules() -> list[str]:
    """Every module of the checkout, as dotted names."""
    names = ["conformalsam.cli"]  # cli.py installs inside a package of the project's own name
    for package in PACKAGES:
        for path in sorted((PROJECT_ROOT / package).rglob("*.py")):
            parts = path.relative_to(PROJECT_ROOT).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


IMPORT_ALL = """
import importlib, sys
from pathlib import Path
site = Path(sys.argv[1]).resolve()
for name in sys.argv[2:]:
    module = importlib.import_module(name)
    where = Path(module.__file__).resolve()
    assert site in where.parents, f"{name} imported from {where}, not from the installed wheel"
print("imported", len(sys.argv) - 2)
"""


def test_the_wheel_installs_every_module_and_its_command_runs(tmp_path):
    source = tmp_path / "src"  # build from a copy: nothing is written into the checkout
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for package in PACKAGES:
        shutil.copytree(PROJECT_ROOT / package, source / package, ignore=ignore)
    for name in ("pyproject.toml", "README.md", "cli.py", "LICENSE"):
        shutil.copy(PROJECT_ROOT / name, source / name)
    wheels = tmp_path / "wheels"
    quiet = dict(check=True, capture_output=True, text=True, timeout=300)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(wheels), str(source)], **quiet)
    (wheel,) = wheels.glob("conformalsam-*.whl")

    env = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], **quiet)
    python = env / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               **quiet).stdout.strip())
    # the dependencies (torch, zarr, ...) from this environment, after the wheel's own folder and without
    # running its .pth files (the editable install of the checkout lives there)
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    "--no-index", str(wheel)], **quiet)

    top = {p.name for p in site.iterdir() if not p.name.endswith((".dist-info", ".pth")) and p.name != "__pycache__"}
    assert top == {"conformalsam", "pipeline", "trainer"}  # no generic top-level module such as cli
    modules = source_modules()
    assert {"trainer.models", "trainer.methods", "pipeline.backends", "pipeline.toy"} <= set(modules)
    run = dict(cwd=tmp_path, **quiet)
    result = subprocess.run([python, "-c", IMPORT_ALL, str(site), *modules], **run)
    assert result.stdout.strip() == f"imported {len(modules)}"
    command = env / "bin" / "conformalsam"
    assert "Usage: conformalsam train" in subprocess.run([command, "train", "--help"], **run).stdout
    split, images, masks = tmp_path / "split", tmp_path / "images", tmp_path / "masks"
    for folder, suffix in ((images, ".jpg"), (masks, ".png")):
        folder.mkdir()
        for i in range(4):
            (folder / f"im{i}{suffix}").write_bytes(b"")  # data split reads names only
    subprocess.run([command, "data", "split", str(images), "--masks", str(masks), "--out", str(split),
                    "--labeled", "1", "--root", str(tmp_path)], **run)
    assert len((split / "unlabeled.txt").read_text().splitlines()) == 3

    # the toy world's whole pipeline, in a folder of its own outside any clone, with the shipped annotator
    installed = sorted(site.rglob("*"))
    here = tmp_path / "anywhere"
    here.mkdir()
    toy = dict(quiet, cwd=here)
    for step in (["toy", "generate", "--train", "70", "--val", "4", "--size", "32"], ["logits"], ["calibrate"],
                 ["train", "--stage", "1", "--epochs", "1", "--crop", "32"],
                 ["train", "--stage", "2", "--epochs", "1", "--crop", "32"]):
        subprocess.run([command, *step], **toy)
    result = subprocess.run([command, "eval", "--checkpoint", "work/runs/toy/stage2/best.pt"], **toy)
    assert "mIoU" in result.stdout and (here / "work" / "masks").is_dir() and (here / "data" / "toy").is_dir()
    assert sorted(site.rglob("*")) == installed  # nothing written into the installed package
