# conformalsam: `make demo` and `make test` do everything on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?=
CFG    := $(if $(CONFIG),--config $(CONFIG),)
CLI    := $(BIN)/conformalsam
# where the toy preset works, and the run name `make train` gives the toy recipe
WORK   ?= work
RUN    ?= toy

.PHONY: setup browser screenshot test demo toy toy-annotator seem-logits seem-setup test-seem bench-seem calibrate bench-logits bench-calibrate \
	bench-train bench-quality bench-real bench-student bench-student-recipe bench-regime bench-alpha bench-alpha-real \
	bench-scale camvid-splits gpu-check gpu-student-smoke train clean

setup: $(STAMP)

# Torch first: with no CUDA here the pinned CPU build (a plain range would pull GBs of CUDA wheels).
define new_venv
	$(PYTHON) -m venv $(1)
	$(1)/bin/pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1; then $(1)/bin/pip install -q torch; \
	else $(1)/bin/pip install -q torch==2.13.0; fi
	$(1)/bin/pip install -q -e '.[dev,hf]'
endef

$(STAMP): pyproject.toml
	$(call new_venv,$(VENV))
	touch $@

test: setup browser
	$(BIN)/python -m pytest

# Debian's chromium and its driver, for the test that renders inspect's page. Where they cannot be installed the
# test skips, except under CONFORMALSAM_REQUIRE_BROWSER (CI), where this target fails.
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
		{ apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
		  { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; }; }; then :; \
	elif [ -n "$$CONFORMALSAM_REQUIRE_BROWSER" ]; then \
		echo "make browser: could not install Debian's chromium and chromium-driver" >&2; exit 1; \
	else echo "make browser: no Debian chromium and chromium-driver here (as root: apt-get install chromium chromium-driver); the page test skips"; fi

toy: setup
	$(CLI) toy generate

demo: toy
	$(CLI) data check $(CFG)
	$(CLI) toy evaluate --split val $(CFG)
	$(CLI) toy evaluate --root data/toy/source --val data/toy/splits/source_val.txt --split val
	$(MAKE) --no-print-directory train
	$(CLI) eval --checkpoint $(WORK)/runs/$(RUN)/stage2/best.pt $(CFG)
	$(CLI) inspect --count 6 --checkpoint $(WORK)/runs/$(RUN)/stage2/best.pt $(CFG)
	$(CLI) summary $(CFG)

# Stage 0 for the labeled and unlabeled splits of the config (CONFIG=file, else ./conformalsam.toml, else the
# toy world, generated first).
seem-logits: $(if $(CONFIG)$(wildcard conformalsam.toml),setup,toy)
	$(CLI) logits --split labeled $(CFG)
	$(CLI) logits --split unlabeled $(CFG)

# Stage 1 on the scores of stage 0 (ALPHA, MODE, RULE override the defaults).
ALPHA ?= 0.1
MODE  ?= paper
RULE  ?= paper
calibrate: seem-logits
	$(CLI) calibrate --alpha $(ALPHA) --mode $(MODE) --rule $(RULE) $(CFG)

# Stage I on the cached masks, then stage II (the recipe follows the data format: toy for the toy world).
train: calibrate
	$(CLI) train --stage 1 $(CFG)
	$(CLI) train --stage 2 $(CFG)

# SEEM, the default annotator (GPU machine): its packages and detectron2 fork into .venv, SEEM into SEEM_DIR
# (what the presets' foundation.code names). Pinned to the commits and versions tested
# (docs/annotators.md 'SEEM'); override SEEM_SRC / D2_SRC with a checkout or URL@ref, SEEM_PINS= for the newest
# packages.
SEEM_GIT  := https://github.com/UX-Decoder/Segment-Everything-Everywhere-All-At-Once.git
SEEM_REF  ?= 7b2e76dbb17d0b7831c6813a921fe2bc8de22926
D2_REF    ?= 42121d75e10d9f858f3a91b6a39f5722c02868f0
D2_SRC    ?= https://github.com/MaureenZOU/detectron2-xyz.git@$(D2_REF)
SEEM_SRC  ?=
SEEM_DIR  ?= third_party/SEEM-v1.0
SEEM_PINS ?= scripts/seem-pins.txt
export SEEM_PINS
seem-setup: setup
	bash scripts/seem_setup.sh $(VENV) "$(D2_SRC)" "$(or $(SEEM_SRC),$(SEEM_GIT)@$(SEEM_REF))" $(if $(SEEM_SRC),,$(SEEM_DIR))

# The SEEM backend against the real SEEM code (CPU, random weights, shrunk layers) in its own .venv-seem:
# make test-seem SEEM_SRC=<SEEM checkout, v1.0 or package> D2_SRC=<detectron2-xyz checkout>. ~1 min + setup.
SEEM_VENV  := .venv-seem
SEEM_STAMP := $(SEEM_VENV)/.installed
$(SEEM_STAMP): pyproject.toml scripts/seem_setup.sh $(SEEM_PINS)
	$(call new_venv,$(SEEM_VENV))
	SEEM_CPU_TEST=1 bash scripts/seem_setup.sh $(SEEM_VENV) "$(D2_SRC)"
	touch $@

test-seem:
	@if [ -z "$(SEEM_SRC)" ]; then echo "test-seem skipped: give SEEM_SRC=<SEEM checkout> D2_SRC=<detectron2-xyz checkout>"; \
	else $(MAKE) --no-print-directory $(SEEM_STAMP) && \
	SEEM_SRC="$(abspath $(SEEM_SRC))" HF_HUB_OFFLINE=1 $(SEEM_VENV)/bin/python -m pytest tests/test_seem_real.py -p no:cacheprovider; fi

# SEEM's own evaluate against this backend's computation: img/s and peak memory, full-size random-weight model.
bench-seem:
	@if [ -z "$(SEEM_SRC)" ] || [ ! -f $(SEEM_STAMP) ]; then \
	echo "bench-seem skipped: run make test-seem first, then give SEEM_SRC=<SEEM checkout>"; \
	else SEEM_SRC="$(abspath $(SEEM_SRC))" HF_HUB_OFFLINE=1 $(SEEM_VENV)/bin/python benchmarks/bench_seem.py $(BENCH_ARGS); fi

bench-logits: setup
	$(BIN)/python benchmarks/bench_logits.py

# Stage 1 at VOC scale (synthetic scores): pixels/s, peak RSS at 1/4, 1/2, all of n; masks/s. ~3 min.
bench-calibrate: setup
	$(BIN)/python benchmarks/bench_calibrate.py

# Training step throughput and peak memory: the toy model on CPU; R101 / SegFormer-B5 too on a GPU.
bench-train: setup
	$(BIN)/python benchmarks/bench_train.py

# The method's ablation on the toy world (3 seeds, 2 split sizes): work/bench/quality.md. ~40 min on 2 cores.
bench-quality: toy
	$(BIN)/python benchmarks/bench_quality.py

# The real-image benchmarks need CamVid, the Cityscapes ESPNetv2 weights and an EdgeNets checkout (docs/data.md 'CamVid').
define with_camvid
	@missing=""; for f in data/CamVid/train third_party/EdgeNets data/weights/espnetv2_s_2.0_city_1024x512.pth $(2); do \
	test -e $$f || missing="$$missing $$f"; done; \
	if [ -n "$$missing" ]; then echo "$@ skipped: missing$$missing (docs/data.md 'Getting the material')"; \
	else $(MAKE) --no-print-directory camvid-splits && $(BIN)/python $(1); fi
endef

# The ablation on real images: CamVid with a Cityscapes-trained ESPNetv2: work/bench/real.md.
bench-real: setup
	$(call with_camvid,benchmarks/bench_real.py)

# The paper's regime on real images: ESPNetv2 from PASCAL VOC weights as the student, Cityscapes ESPNetv2s of three
# widths as annotators: work/bench/student.md. Needs bench-real's inputs and the PASCAL and narrower Cityscapes
# ESPNetv2 weights in data/weights (docs/data.md 'Getting the material'). ~82 min on 2 cores after the stores.
STUDENT_INPUTS := $(foreach w,1.5 1.0,data/weights/espnetv2_s_$(w)_city_1024x512.pth) data/weights/espnetv2_s_1.0_pascal_384x384.pth
bench-student: setup
	$(call with_camvid,benchmarks/bench_student.py,$(STUDENT_INPUTS))

# What caps the labeled-only student at CamVid 1/2 (crop, width, scale, steps, lr, head, class weights), one lever at
# a time: val mIoU against seconds, work/bench/student-recipe.md. Needs bench-student's inputs. ~70 min on 2 cores.
bench-student-recipe: setup
	$(call with_camvid,benchmarks/bench_student_recipe.py,$(STUDENT_INPUTS))

# The paper's regime on real images: CamVid 1/2, the two weakest annotators (DiCENet s0.5, ESPNetv2 s1.0), labeled
# only / raw / CP crc / CP mondrian, 3 seeds, the student recipe bench-student-recipe chose: work/bench/regime.md.
# Needs bench-student's inputs and DiCENet s0.5's Cityscapes weights. 192 min on 2 cores. Adding 1_4 to --splits and
# paper to --variants in REGIME_ARGS measures 1/4 and the paper row too (about 7 hours more).
REGIME_ARGS ?= --name regime --splits 1_2 --annotators dicenet0.5 s1.0 --variants crc mondrian --stage1-only \
	--epochs 24 1 --eval-from 0.75 --class-weights median-frequency
bench-regime: setup
	$(call with_camvid,benchmarks/bench_student.py $(REGIME_ARGS),$(STUDENT_INPUTS) data/weights/dicenet_s_0.5_city_1024x512.pth)

# The score store and stage 1 at ADE20K / COCO / VOC scale (500 images each, from real softmax maps on CamVid) and on
# the real CamVid store, float16 against uint8: bytes, write cost, stage 1 time and peak RSS, mask agreement, and
# projections to the full data sets: work/bench/scale.md. Needs bench-student's inputs. ~30 min on 2 cores.
bench-scale: setup
	$(call with_camvid,benchmarks/bench_scale.py,$(STUDENT_INPUTS) data/weights/espnetv2_s_2.0_pascal_384x384.pth)

# What alpha is worth to the student: stage I on each alpha of a grid (paper and crc, 3 seeds, 2 splits), and the
# rules that choose alpha from the labeled set against it: work/bench/alpha-quality.md (toy world, ~62 min on 2
# cores) and alpha-real.md (CamVid, ~76 min on top of bench-real's runs, which it reuses).
bench-alpha: toy
	$(BIN)/python benchmarks/bench_alpha.py toy

bench-alpha-real: setup
	$(call with_camvid,benchmarks/bench_alpha.py camvid)

# CamVid's split files (seeded): data/splits/camvid/{1_16,1_8,1_4,1_2}/ and val.txt.
camvid-splits: setup
	@for n in 16 8 4 2; do test -f data/splits/camvid/1_$$n/labeled.txt || \
	$(CLI) data split data/CamVid/train --masks data/CamVid/trainannot --labeled 1/$$n --root data/CamVid \
	--out data/splits/camvid/1_$$n || exit 1; done
	@test -f data/splits/camvid/val.txt || $(CLI) data list data/CamVid/val --masks data/CamVid/valannot \
	--root data/CamVid --out data/splits/camvid/val.txt

# On a GPU machine, ~3-8 min: stage 0 on CUDA, train + resume (bf16, channels-last) for R101 and MiT-B5, stage II
# unimatch, sliding eval, AMP vs fp32 throughput -> work/gpu-check.json (the test suite runs its --dry CPU path).
# The GPU kit of issue 34 on the CPU with tiny settings: the whole path of `gpu_student.sh run`, a few minutes.
# Needs .gpu-student/ from `bash benchmarks/gpu_student.sh prepare [UNIMATCH_SRC]` (bench-student's inputs).
gpu-student-smoke: setup
	@if [ -f .gpu-student/quality.json ]; then \
		OUT=$(WORK)/gpu-student-smoke RUNS=$$(mktemp -d) bash benchmarks/gpu_student.sh run --smoke; \
	else echo "make gpu-student-smoke: no .gpu-student/ here; run bash benchmarks/gpu_student.sh prepare first"; fi

gpu-check: setup
	$(BIN)/python benchmarks/gpu_check.py

# The README's picture of inspect's page, from the demo's work folder (run `make demo` first).
screenshot: setup browser
	$(CLI) inspect --count 4 $(CFG)
	$(BIN)/python tests/browser.py $(WORK)/inspect/index.html docs/inspect-page.png

# Retrain the shipped toy annotator (pipeline/toy/annotator.pt) on the source domain: ~3 min on 2 cores.

toy-annotator: toy
	$(CLI) toy train-annotator --out pipeline/toy/annotator.pt

clean:
	rm -rf work data/toy .pytest_cache
