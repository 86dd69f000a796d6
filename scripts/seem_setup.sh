#!/usr/bin/env bash
# SEEM's run-time packages and its detectron2 fork, into a virtual environment that already holds this
# project, without changing the project's pins (Pillow >= 10, zarr 3, numpy 2, transformers 5).
#
#   scripts/seem_setup.sh VENV D2_SRC [SEEM_SRC [SEEM_DIR]]
#
# D2_SRC: a checkout of MaureenZOU/detectron2-xyz (a folder) or its git URL, with @commit (or @branch) to pin it.
#   It is built against the installed torch (--no-build-isolation: its setup.py imports torch), without its
#   declared dependencies (--no-deps: they pin black 21.4b2, which would downgrade click under typer), and
#   without CUDA kernels: its setup.py compiles them whenever it sees a GPU, and its deformable convolution
#   kernel includes THC/THCAtomics.cuh, which torch 2 no longer ships. SEEM calls none of detectron2's C++ ops
#   (structures, data and config only); their CPU versions are built.
# SEEM_SRC (optional): a SEEM checkout (branch v1.0 or package), or a git URL with @commit or @branch, fetched
#   into SEEM_DIR (default third_party/SEEM-<ref>). SEEM itself is not pip-installed: v1.0 would install
#   top-level packages named pipeline, trainer and utils over this project's, and both branches pin Pillow 9 and
#   numpy 1. The backend imports it from the folder named by foundation.code.
# Environment: SEEM_PINS, a pip constraints file of the tested versions of SEEM's run-time packages (empty:
#   the newest); SEEM_CPU_TEST=1 accepts PyPI's CUDA torchvision beside a CPU torch (make test-seem declares its
#   op schemas; the product never runs SEEM on such a pair).
set -euo pipefail
usage="usage: scripts/seem_setup.sh VENV D2_SRC [SEEM_SRC [SEEM_DIR]]"
venv=${1:?$usage}
d2=${2:?$usage}
seem=${3:-}
seem_dir=${4:-}
pins=${SEEM_PINS-scripts/seem-pins.txt}
py="$venv/bin/python"
fail() { echo "error: $*" >&2; exit 2; }
[ -x "$py" ] || fail "$venv: no virtual environment here (run make setup first)"
[ -z "$pins" ] || [ -f "$pins" ] || fail "SEEM_PINS=$pins: no such file (SEEM_PINS= installs the newest releases)"

# "URL@ref" -> url, ref (a ref has no / or :, so ssh's git@host:user/repo is not split)
split_ref() {
  local tail=${1##*@}
  if [[ "$tail" != "$1" && "$tail" != *[/:]* ]]; then url=${1%@*}; ref=$tail; else url=$1; ref=; fi
}

# check the sources named before installing anything (a git URL is reached by pip or git later)
case "$d2" in
  git+*|http*://*|git@*)
    split_ref "${d2#git+}"
    case "$url" in git@*) host=${url#git@}; url="ssh://git@${host/://}" ;; esac  # git@host:user/repo
    src="git+$url${ref:+@$ref}" ;;
  *) [ -f "$d2/setup.py" ] || fail "D2_SRC=$d2: not a detectron2 checkout (no setup.py in it)"
     src=$(cd "$d2" && pwd) ;;
esac
if [ -n "$seem" ]; then
  case "$seem" in
    http*://*|git@*)
      split_ref "$seem"
      ref=${ref:-v1.0}
      dest=${seem_dir:-third_party/SEEM-$ref}
      if [ ! -d "$dest" ]; then
        echo "== SEEM $ref from $url into $dest"
        git init -q "$dest.partial"
        git -C "$dest.partial" fetch -q --depth 1 "$url" "$ref"  # a branch, a tag or a full commit id
        git -C "$dest.partial" checkout -q FETCH_HEAD
        mv "$dest.partial" "$dest"
      elif [ -d "$dest/.git" ] && [[ "$ref" =~ ^[0-9a-f]{40}$ ]] && [ "$(git -C "$dest" rev-parse HEAD)" != "$ref" ]; then
        echo "warning: $dest is at $(git -C "$dest" rev-parse --short HEAD), not the pinned $ref; remove it to fetch the pin" >&2
      fi
      seem=$dest ;;
  esac
  if [ -d "$seem/modeling" ] || [ -d "$seem/seem/modeling" ]; then
    seem=$(cd "$seem" && pwd)
  else
    fail "SEEM_SRC=$seem: not a SEEM checkout (no modeling/ or seem/modeling/ in it)"
  fi
fi

# torchvision: keep one that imports; else the release built for this torch (2.N <-> 0.(N+15)). A plain
# `pip install torchvision` would replace torch with the newest CUDA build.
vision_error() { { "$py" -c "import torchvision" 2>&1 || true; } | tail -n 1; }
if [ -n "$(vision_error)" ]; then
  release=$("$py" -c 'import torch; m = int(torch.__version__.split(".")[1]); print(f"0.{m + 15}.*")')
  echo "== torchvision $release (the release built for this torch)"
  "$py" -m pip install -q "torchvision==$release" ${pins:+-c "$pins"}
fi
problem=$(vision_error)
if [ -n "$problem" ]; then
  cpu=$("$py" -c 'import torch; print(int(torch.version.cuda is None))')
  if [ "$cpu" = 1 ] && [ "${SEEM_CPU_TEST:-}" = 1 ] && [[ "$problem" == *"torchvision::nms does not exist"* ]]; then
    echo "== torchvision is a CUDA build beside a CPU torch: the real-code test declares its op schemas"
  elif [ "$cpu" = 1 ]; then
    fail "torchvision does not import beside this CPU-only torch ($problem): the package index's torchvision is" \
         "a CUDA build. SEEM builds on CUDA only: run make seem-setup on a GPU machine (make setup installs the" \
         "CUDA torch there), or install torch and torchvision from one build (pip install torch torchvision" \
         "--index-url https://download.pytorch.org/whl/cpu)"
  else
    fail "torchvision does not import beside torch $("$py" -c 'import torch; print(torch.__version__)') ($problem):" \
         "install the torchvision release made for this torch (torch 2.N <-> torchvision 0.(N+15))"
  fi
fi

packages=(fvcore iopath omegaconf hydra-core pycocotools matplotlib termcolor tabulate cloudpickle tqdm yacs pyyaml
          scipy timm kornia einops nltk opencv-python-headless ftfy regex sentencepiece 'transformers>=5'
          mpi4py mpich setuptools wheel ninja)
echo "== SEEM's run-time packages${pins:+ (versions pinned by $pins)}"
"$py" -m pip install -q "${packages[@]}" ${pins:+-c "$pins"}

echo "== detectron2-xyz from $d2 (its C++ ops, CPU versions: about a minute on 2 cores)"
start=$(date +%s)
CUDA_VISIBLE_DEVICES="" FORCE_CUDA=0 "$py" -m pip install -q --no-build-isolation --no-deps "$src"
echo "   built in $(( $(date +%s) - start )) s"

[ -n "$seem" ] && echo "== SEEM checkout: $seem (in conformalsam.toml, [foundation]: code = \"$seem\")"
echo "== what this environment now holds"
"$py" - <<'PY'
from importlib.metadata import version

for name in ("torch", "torchvision", "detectron2", "timm", "kornia", "transformers", "pillow", "numpy", "zarr", "mpi4py"):
    print(f"  {name} {version(name)}")
PY
