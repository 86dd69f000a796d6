"""scripts/seem_setup.sh's decisions, against a stand-in interpreter that logs what it is asked (nothing is
installed, nothing is fetched): the pins it passes, the CUDA-free detectron2 build, torchvision beside a
CPU-only torch, and its one-line refusals."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from pipeline import PROJECT_ROOT

SCRIPT = PROJECT_ROOT / "scripts" / "seem_setup.sh"

# Answers like a venv's python: `import torchvision` fails with VISION_ERROR until pip installs torchvision
# (when FIXABLE), torch.version.cuda is None when CPU=1; every call is logged with the variables the build sees.
PYTHON = """#!/usr/bin/env bash
echo "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset} FORCE_CUDA=${FORCE_CUDA-unset} $*" >> "$LOG"
case "$*" in
  "-c import torchvision")
    if [ -n "$VISION_ERROR" ] && [ ! -f "$STATE/vision-installed" -o -z "$FIXABLE" ]; then
      echo "Traceback (most recent call last):" >&2; echo "$VISION_ERROR" >&2; exit 1; fi ;;
  *"torch.version.cuda"*) [ "$CPU" = 1 ] && echo 1 || echo 0 ;;
  *"torch.__version__.split"*) echo "0.28.*" ;;
  *"print(torch.__version__)"*) echo "2.13.0" ;;
  "-m pip install -q torchvision=="*) touch "$STATE/vision-installed" ;;
esac
exit 0
"""


@pytest.fixture
def venv(tmp_path):
    bin_ = tmp_path / "venv" / "bin"
    bin_.mkdir(parents=True)
    (bin_ / "python").write_text(PYTHON)
    (bin_ / "python").chmod(0o755)
    (tmp_path / "d2").mkdir()
    (tmp_path / "d2" / "setup.py").write_text("")
    (tmp_path / "seem" / "modeling").mkdir(parents=True)
    return tmp_path


def setup(venv: Path, *args, **env):
    log = venv / "log"
    log.write_text("")
    run = subprocess.run(["bash", str(SCRIPT), str(venv / "venv"), *args], capture_output=True, text=True,
                         cwd=PROJECT_ROOT, env={**os.environ, "LOG": str(log), "STATE": str(venv), **env})
    return run, log.read_text().splitlines()


def test_pins_and_a_detectron2_build_without_cuda_kernels(venv):
    run, calls = setup(venv, str(venv / "d2"), str(venv / "seem"))
    assert run.returncode == 0, run.stderr
    installs = [c for c in calls if "-m pip install" in c]
    assert any("timm" in c and "-c scripts/seem-pins.txt" in c for c in installs)
    build = [c for c in installs if str(venv / "d2") in c]
    assert build == [f"CUDA_VISIBLE_DEVICES= FORCE_CUDA=0 -m pip install -q --no-build-isolation --no-deps {venv}/d2"]
    assert "torchvision" not in " ".join(installs)  # one that imports is kept


def test_urls_carry_their_pinned_ref_to_pip(venv):
    run, calls = setup(venv, "https://github.com/MaureenZOU/detectron2-xyz.git@42121d75e10d9f858f3a91b6a39f5722c02868f0",
                       SEEM_PINS="")
    assert run.returncode == 0, run.stderr
    build = [c for c in calls if "--no-deps" in c][0]
    assert build.endswith("git+https://github.com/MaureenZOU/detectron2-xyz.git@42121d75e10d9f858f3a91b6a39f5722c02868f0")
    assert not any("pins" in c for c in calls)  # SEEM_PINS= : the newest releases
    run, calls = setup(venv, "git@github.com:MaureenZOU/detectron2-xyz.git")
    assert [c for c in calls if "--no-deps" in c][0].endswith("git+ssh://git@github.com/MaureenZOU/detectron2-xyz.git")


def test_a_torchvision_that_installs_right_is_used(venv):
    run, calls = setup(venv, str(venv / "d2"), VISION_ERROR="ModuleNotFoundError: No module named 'torchvision'",
                       FIXABLE="1")
    assert run.returncode == 0, run.stderr
    assert any(c.endswith("-m pip install -q torchvision==0.28.* -c scripts/seem-pins.txt") for c in calls)


CUDA_VISION = "RuntimeError: operator torchvision::nms does not exist"


def test_a_cuda_torchvision_beside_a_cpu_torch_stops_before_the_build_with_the_fix(venv):
    run, calls = setup(venv, str(venv / "d2"), VISION_ERROR=CUDA_VISION, CPU="1")
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("error: torchvision does not import beside this "
                                                                 "CPU-only torch")
    assert "GPU machine" in run.stderr and "download.pytorch.org/whl/cpu" in run.stderr
    assert not any("--no-deps" in c for c in calls)  # nothing built
    run, _ = setup(venv, str(venv / "d2"), VISION_ERROR=CUDA_VISION, CPU="1", SEEM_CPU_TEST="1")
    assert run.returncode == 0, run.stderr  # the real-code test declares the schemas itself
    run, _ = setup(venv, str(venv / "d2"), VISION_ERROR="ImportError: libcudart.so.13", CPU="0")
    assert run.returncode == 2 and "torchvision does not import beside torch 2.13.0" in run.stderr


@pytest.mark.parametrize("args, env, message", [
    (["{venv}/nowhere"], {}, "D2_SRC={venv}/nowhere: not a detectron2 checkout"),
    (["{venv}/d2", "{venv}/d2"], {}, "SEEM_SRC={venv}/d2: not a SEEM checkout"),
    (["{venv}/d2"], {"SEEM_PINS": "{venv}/pins.txt"}, "SEEM_PINS={venv}/pins.txt: no such file"),
])
def test_wrong_sources_are_one_line_before_anything_is_installed(venv, args, env, message):
    run, calls = setup(venv, *[a.format(venv=venv) for a in args], **{k: v.format(venv=venv) for k, v in env.items()})
    assert run.returncode == 2
    assert run.stderr.startswith(f"error: {message.format(venv=venv)}") and run.stderr.count("\n") == 1
    assert not any("pip install" in c for c in calls)
