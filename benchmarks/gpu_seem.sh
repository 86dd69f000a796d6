#!/usr/bin/env bash
# SEEM on a GPU machine that cannot reach the network, in one call (issue 23's device check).
#
#   bash benchmarks/gpu_seem.sh prepare SEEM_SRC D2_SRC   # here: sources and wheels into .gpu-seem/ (~36 MB)
#   bash benchmarks/gpu_seem.sh run                        # there, from the repository root, carry .gpu-seem
#
# run: the real set-up script (scripts/seem_setup.sh, as `make seem-setup` runs it, offline from the carried
# wheels) into a virtual environment over the machine's python3 (its CUDA torch), timing detectron2's build;
# the real-code tests, the CUDA one included (`conformalsam logits --device cuda` against the CPU store);
# then benchmarks/bench_seem.py for focal-T and focal-L, fp16 autocast, batch 1 and 8. Figures go to
# $OUT (or work/gpu-seem/): the log, seem-<model>-b<batch>.json. A user with network needs none of this:
# `make setup seem-setup`, then `make bench-seem`.
set -euo pipefail
here=.gpu-seem
out=${OUT:-work/gpu-seem}

prepare() {
  local seem=${1:?usage: gpu_seem.sh prepare SEEM_SRC D2_SRC} d2=${2:?usage: gpu_seem.sh prepare SEEM_SRC D2_SRC}
  rm -rf "$here" && mkdir -p "$here/wheels"
  # SEEM without its demo images and assets; detectron2-xyz without its build, docs and tests
  mkdir -p "$here/seem" "$here/d2"
  tar -C "$seem" --exclude ./assets --exclude ./demo --exclude ./inference/images --exclude .git -cf - . |
    tar -C "$here/seem" -xf -
  tar -C "$d2" --exclude ./build --exclude ./docs --exclude ./tests --exclude ./demo --exclude .git \
    --exclude '*.egg-info' -cf - . | tar -C "$here/d2" -xf -
  # what the GPU image (Python 3.12) lacks, or holds at another version than the pins / this project need
  local binary=(zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 pycocotools==2.0.11
                mpi4py==4.1.2 mpich==5.0.2 timm==0.4.12 kornia==0.7.0 omegaconf==2.3.1 hydra-core==1.3.8
                yacs==0.1.8 termcolor==3.3.0 nltk==3.10.4 ftfy==6.3.1 wcwidth==0.9.4 einops==0.8.2)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 -d "$here/wheels" "${binary[@]}"
  # published as source only, pure Python: built into wheels here
  python3 -m pip wheel -q --no-deps -w "$here/wheels" fvcore==0.1.5.post20221221 iopath==0.1.10 \
    antlr4-python3-runtime==4.9.3
  du -sh "$here"/* "$here"
}

run() {
  [ -d "$here/wheels" ] || { echo "error: $here/ missing: run 'gpu_seem.sh prepare' here and carry it" >&2; exit 2; }
  mkdir -p "$out"
  exec > >(tee "$out/log") 2>&1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  export PIP_NO_INDEX=1 PIP_FIND_LINKS=$PWD/$here/wheels PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1
  venv=/tmp/gpu-seem-venv
  python3 -m venv --system-site-packages "$venv"
  "$venv/bin/python" -m pip install -q --no-build-isolation -e .
  start=$(date +%s)
  bash scripts/seem_setup.sh "$venv" "$here/d2" "$here/seem"
  echo "seem-setup took $(( $(date +%s) - start )) s"
  "$venv/bin/python" -c "import torch, detectron2; print('torch', torch.__version__, 'CUDA', torch.cuda.is_available())"
  SEEM_SRC=$here/seem "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_seem_real.py -rs || echo "real-code tests FAILED"
  for model in focalt focall; do
    for batch in 1 8; do
      SEEM_SRC=$here/seem "$venv/bin/python" benchmarks/bench_seem.py --model "$model" --batch "$batch" --amp \
        --vocab voc coco --repeats 3 --out "$out/seem-$model-b$batch.json" || echo "bench $model b$batch FAILED"
    done
  done
}

case "${1:-}" in
  prepare) shift; prepare "$@" ;;
  run) run ;;
  *) echo "usage: gpu_seem.sh prepare SEEM_SRC D2_SRC | gpu_seem.sh run" >&2; exit 2 ;;
esac
