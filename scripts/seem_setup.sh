#!/usr/bin/env bash
# SEEM's run-time packages and its detectron2 fork, into a virtual environment that already holds this
# project, without changing the project's pins (Pillow >= 10, zarr 3, numpy 2, transformers 5).
#
#   scripts/seem_setup.sh VENV D2_SRC [SEEM_SRC]
#
# D2_SRC: a checkout of MaureenZOU/detectron2-xyz (a folder) or its git URL. It is built against the installed
# torch (--no-build-isolation: its setup.py imports torch) and without its declared dependencies (--no-deps:
# they pin black 21.4b2, which would downgrade click under typer); what it needs at run time is installed here.
# SEEM_SRC (optional): a SEEM checkout (branch v1.0 or package), or a git URL with @branch, cloned into
# third_party/. SEEM itself is not pip-installed: v1.0 would install top-level packages named pipeline,
# trainer and utils over this project's, and both branches pin Pillow 9 and numpy 1. The backend imports it
# from the folder named by foundation.code.
set -euo pipefail
usage="usage: scripts/seem_setup.sh VENV D2_SRC [SEEM_SRC]"
venv=${1:?$usage}
d2=${2:?$usage}
seem=${3:-}
py="$venv/bin/python"
[ -x "$py" ] || { echo "error: $venv: no virtual environment here (run make setup first)" >&2; exit 2; }

# check the sources named before installing anything (a git URL is reached by pip or git later)
case "$d2" in
  git+*) src=$d2 ;;
  http*://*) src="git+$d2" ;;
  git@*) host=${d2#git@}; src="git+ssh://git@${host/://}" ;;  # git@host:user/repo -> git+ssh://git@host/user/repo
  *) [ -f "$d2/setup.py" ] || { echo "error: D2_SRC=$d2: not a detectron2 checkout (no setup.py in it)" >&2; exit 2; }
     src=$(cd "$d2" && pwd) ;;
esac
if [ -n "$seem" ]; then
  case "$seem" in
    http*://*|git@*)
      url=$seem; branch=v1.0; tail=${seem##*@}
      if [[ "$tail" != "$seem" && "$tail" != *[/:]* ]]; then url=${seem%@*}; branch=$tail; fi
      dest="third_party/SEEM-$branch"
      [ -d "$dest" ] || git clone -q --depth 1 --branch "$branch" "$url" "$dest"
      seem=$dest ;;
  esac
  if [ -d "$seem/modeling" ] || [ -d "$seem/seem/modeling" ]; then
    seem=$(cd "$seem" && pwd)
  else
    echo "error: SEEM_SRC=$seem: not a SEEM checkout (no modeling/ or seem/modeling/ in it)" >&2; exit 2
  fi
fi

packages=(fvcore iopath omegaconf hydra-core pycocotools matplotlib termcolor tabulate cloudpickle tqdm yacs pyyaml
          scipy timm kornia einops nltk opencv-python-headless ftfy regex sentencepiece 'transformers>=5'
          mpi4py mpich setuptools wheel ninja)
# torchvision: keep one that imports; else the release built for this torch (2.N <-> 0.(N+15)). A plain
# `pip install torchvision` would replace torch with the newest CUDA build.
if ! "$py" -c "import torchvision" >/dev/null 2>&1; then
  packages+=("torchvision==$("$py" -c 'import torch; m = int(torch.__version__.split(".")[1]); print(f"0.{m + 15}.*")')")
fi
echo "== SEEM's run-time packages"
"$py" -m pip install -q "${packages[@]}"

echo "== detectron2-xyz from $d2 (compiles its C++ ops: about a minute on 2 cores)"
"$py" -m pip install -q --no-build-isolation --no-deps "$src"

[ -n "$seem" ] && echo "== SEEM checkout: $seem (in conformalsam.toml, [foundation]: code = \"$seem\")"
echo "== what this environment now holds"
"$py" - <<'PY'
from importlib.metadata import version

for name in ("torch", "torchvision", "detectron2", "transformers", "pillow", "numpy", "zarr", "mpi4py"):
    print(f"  {name} {version(name)}")
try:
    import torchvision  # noqa: F401
except Exception as exc:  # e.g. PyPI's CUDA torchvision beside a CPU-only torch
    print(f"  warning: torchvision does not import here ({type(exc).__name__}: {exc}); SEEM needs it")
PY
