"""`make gpu-check`: what the CPU tests cannot exercise, in one run of at most ~8 minutes on one GPU.

1. stage 0 with a TorchScript model on CUDA (fp16 autocast): the store against the same model on CPU;
2. stage I train + resume (crash after epoch 1, resume, finish) with bf16 AMP and channels-last, for both
   model families: DeepLabV3+ R101 at crop 321 and SegFormer MiT-B5 at crop 513, batch 8, random init;
3. stage II `--method unimatch` on CUDA from each family's stage I (with an EMA teacher for SegFormer);
4. sliding-window evaluation on CUDA against whole-image evaluation of the same model;
5. training-step throughput and peak GPU memory, bf16 AMP + channels-last against fp32 (TF32 off) in the
   same run, each configuration in its own process (benchmarks/bench_train.py): the ratio is the figure.

Writes its figures to work/gpu-check.json (--out) and prints them. `--dry` runs the same path on CPU with
tiny models and crops (what CPU can do: no AMP, no channels-last), so the script cannot rot: the test
suite runs it. Exit code 1 when a check failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
import bench_train  # noqa: E402
from isolated import measure  # noqa: E402
from pipeline import PROJECT_ROOT  # noqa: E402
from pipeline.atomic import write_text_atomic  # noqa: E402
from pipeline.stage1.calibrate import Settings, run_calibrate  # noqa: E402
from pipeline.config import Config  # noqa: E402
from pipeline.data.datasets import Dataset  # noqa: E402
from pipeline.stage0.logits import run_logits  # noqa: E402
from pipeline.stage0.store import LogitsStore  # noqa: E402
from pipeline.toy.world import WorldSpec, generate  # noqa: E402
from trainer.checkpoint import load_checkpoint, load_trained  # noqa: E402
from trainer.data import ValImages  # noqa: E402
from trainer.evaluate import evaluate  # noqa: E402
from trainer.recipes import Recipe  # noqa: E402
from trainer.stages import run_dir, train_stage  # noqa: E402

FULL = {"world": WorldSpec(train=80, val=6, source_val=2, size=160), "split": "16", "batch": 8, "steps": 20,
        "families": [("deeplabv3plus-r101", 321), ("segformer-b5", 513)]}
DRY = {"world": WorldSpec(train=66, val=2, source_val=1, size=32), "split": "64", "batch": 2, "steps": 1,
       "families": [("deeplabv3plus-tiny", 32), ("segformer-tiny", 32)]}


class Crash(Exception):
    """Raised after the first epoch: the run is then resumed from its checkpoint."""


def tiny_annotator(classes: int) -> torch.jit.ScriptModule:
    """A random-weight fully convolutional annotator, scripted (what a user's TorchScript export is)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, classes, 1))
    return torch.jit.script(net.eval())


def stage0(config: Config, device: str, out: Path) -> dict:
    classes = Dataset(config).classes
    weights = out / "annotator.pt"
    tiny_annotator(len(classes)).save(str(weights))
    config = replace(config, backend="torchscript", weights=weights, outputs=tuple(classes))
    started = time.perf_counter()
    for split in ("labeled", "unlabeled"):
        run_logits(config, split, device=device, workers=2, info=lambda m: None, warn=lambda m: None)
    seconds = time.perf_counter() - started
    reference = replace(config, work_dir=out / "cpu")
    run_logits(reference, "labeled", device="cpu", workers=0, info=lambda m: None, warn=lambda m: None)
    here, there = LogitsStore(config.work_dir / "logits.zarr"), LogitsStore(reference.work_dir / "logits.zarr")
    diff = max(float((here.probabilities(i) - there.probabilities(i)).abs().max()) for i in there.ids())
    images = len(here)
    assert diff < 2e-2, f"the {device} store differs from the CPU store by {diff:.3g} in probability"
    return {"images": images, "images_per_s": images / seconds, "max_probability_difference_vs_cpu": diff}


def train_resume(config: Config, recipe: Recipe, device: str) -> dict:
    """Crash after epoch 1, resume, finish; against a straight run of the same recipe."""
    def crash(record):
        if record["epoch"] == 1:
            raise Crash

    name = recipe.model
    started = time.perf_counter()
    straight = train_stage(config, "gpu-check", recipe, 1, name=f"{name}-straight", device=device, log=lambda m: None)
    seconds = time.perf_counter() - started
    # A second straight run: on a GPU, non-deterministic kernels make two identical runs drift apart; resume is
    # right when it drifts from the straight run no more than that.
    train_stage(config, "gpu-check", recipe, 1, name=f"{name}-again", device=device, log=lambda m: None)
    try:
        train_stage(config, "gpu-check", recipe, 1, name=name, device=device, log=lambda m: None, on_epoch=crash)
    except Crash:
        pass
    resumed = train_stage(config, "gpu-check", recipe, 1, name=name, resume=True, device=device, log=lambda m: None)
    a, again = (load_checkpoint(run_dir(config, f"{name}-{run}", 1) / "last.pt")["model"] for run in ("straight", "again"))
    b = load_checkpoint(run_dir(config, name, 1) / "last.pt")
    assert b["epoch"] == recipe.epochs[0], f"resumed run ended at epoch {b['epoch']}"
    return {"epochs": recipe.epochs[0], "seconds_straight": seconds, "best_miou": straight["best"],
            "resumed_best_miou": resumed["best"], "weight_drift_resumed_vs_straight": drift(a, b["model"]),
            "weight_drift_straight_vs_straight": drift(a, again)}


def drift(a: dict, b: dict) -> float:
    """The largest relative difference ||a - b|| / ||a|| over the learned tensors (BatchNorm's running statistics,
    which can be huge in a random-init network, excluded)."""
    return max(float((a[k].float() - b[k].float()).norm() / a[k].float().norm().clamp_min(1e-12))
               for k in a if a[k].is_floating_point() and "running_" not in k)


def unimatch(config: Config, recipe: Recipe, device: str) -> dict:
    started = time.perf_counter()
    recipe = replace(recipe, ema=0.99) if recipe.model.startswith("segformer") else recipe
    summary = train_stage(config, "gpu-check", recipe, 2, name=f"{recipe.model}-straight", device=device,
                          log=lambda m: None, method="unimatch")
    return {"epochs": recipe.epochs[1], "ema": recipe.ema, "seconds": time.perf_counter() - started,
            "best_miou": summary["best"]}


def sliding(config: Config, recipe: Recipe, device: str) -> dict:
    dataset = Dataset(config)
    model = load_trained(run_dir(config, f"{recipe.model}-straight", 1) / "best.pt", dataset.classes)[0].to(device)
    val = ValImages(dataset, dataset.split("val"))
    window = max(32, dataset.load(dataset.split("val")[0])[0].shape[0] * 2 // 3)  # several windows per image
    started = time.perf_counter()
    result = {mode: evaluate(model, val, dataset.num_classes, torch.device(device), mode, window)["miou"]
              for mode in ("sliding", "whole")}
    return {"window": window, "seconds": time.perf_counter() - started, "miou_sliding": result["sliding"],
            "miou_whole": result["whole"]}


def throughput(families, batch: int, device: str, steps: int) -> dict:
    """bench_train's stage-I step per family, fast (bf16 + channels-last on a GPU) and fp32, each in its own
    process on a GPU (its own peak memory); in this process for the dry run, which only exercises the path."""
    script = str(Path(__file__).resolve().parent / "bench_train.py")

    def run(args):
        if device == "cpu":
            return bench_train.job(model, crop, batch, device, steps, 1, precision == "fast"), None
        return measure(script, args)

    out = {}
    for model, crop in families:
        row = {}
        for precision in ("fast", "fp32"):
            try:
                result, rss = run([model, str(crop), str(batch), device, precision, "--steps", str(steps)])
                row[precision] = {"images_per_s": result["images_per_s"], "step_ms": result["step_ms"],
                                  "peak_mb": result.get("peak_gpu_mb", rss)}
            except SystemExit as exc:  # e.g. out of memory at fp32: recorded, the rest still runs
                row[precision] = {"error": str(exc)}
        if "images_per_s" in row["fast"] and "images_per_s" in row["fp32"]:
            row["speedup_fast_vs_fp32"] = row["fast"]["images_per_s"] / row["fp32"]["images_per_s"]
            if row["fp32"]["peak_mb"]:  # none in the dry run, which shares this process
                row["memory_fast_vs_fp32"] = row["fast"]["peak_mb"] / row["fp32"]["peak_mb"]
        out[f"{model} crop {crop}"] = row
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry", action="store_true", help="CPU, tiny models: the same path, minus what needs CUDA")
    parser.add_argument("--no-throughput", action="store_true", help="skip the throughput part (about 4 min on a GPU)")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "work" / "gpu-check.json")
    args = parser.parse_args(argv)
    if not args.dry and not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; run it on a GPU machine, or `--dry` for the CPU path")
        return 2
    size, device = (DRY, "cpu") if args.dry else (FULL, "cuda")
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)",
              "torch": torch.__version__, "dry": args.dry, "checks": {}}
    started = time.perf_counter()

    def check(name, fn, *fn_args):
        began = time.perf_counter()
        try:
            report["checks"][name] = {"ok": True, **fn(*fn_args)}
        except Exception as exc:
            traceback.print_exc()
            report["checks"][name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        report["checks"][name]["wall_s"] = time.perf_counter() - began
        print(f"{name}: {json.dumps(report['checks'][name])}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        generate(tmp / "toy", size["world"])
        splits = tmp / "toy" / "splits"
        config = Config(format="folder", root=tmp / "toy" / "target", labeled=splits / size["split"] / "labeled.txt",
                        unlabeled=splits / size["split"] / "unlabeled.txt", val=splits / "val.txt", classes=None,
                        backend="torchscript", weights=None, work_dir=tmp / "work", source="gpu-check")
        check("stage0_torchscript", stage0, config, device, tmp)
        check("stage1_masks", lambda: {"kept": run_calibrate(config, Settings(alpha=0.1), jobs=1, warn=lambda m: None)[
            "diagnostics"]["unlabeled"]["kept_fraction"]})
        for model, crop in size["families"] if report["checks"]["stage1_masks"]["ok"] else []:
            recipe = Recipe(model=model, crop=crop, batch_size=size["batch"], epochs=(2, 1), optimizer="sgd",
                            lr=1e-3, workers=2, amp="bf16", eval_from=0.0)
            check(f"train_resume {model} crop {crop}", train_resume, config, recipe, device)
            if report["checks"][f"train_resume {model} crop {crop}"]["ok"]:
                check(f"unimatch_stage2 {model}", unimatch, config, recipe, device)
                check(f"eval_sliding {model}", sliding, config, recipe, device)
    if device == "cuda":  # the measuring processes get the memory this one cached
        torch.cuda.empty_cache()
    report["throughput"] = {} if args.no_throughput else throughput(size["families"], size["batch"], device, size["steps"])
    report["wall_s"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, json.dumps(report, indent=1) + "\n")
    for name, row in report["throughput"].items():
        print(f"{name}: " + "; ".join(f"{k} {json.dumps(v)}" for k, v in row.items()))
    failed = [name for name, c in report["checks"].items() if not c["ok"]]
    print(f"gpu-check on {report['device']}: {len(report['checks']) - len(failed)} of {len(report['checks'])} checks "
          f"passed{'; failed: ' + ', '.join(failed) if failed else ''}; {report['wall_s']:.0f} s -> {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
