"""`make bench-quality`: the method's ablation on the toy world, averaged over seeds.

Per labeled-split size, every row trains the same model for the same number of steps (the `toy`
recipe at crop 64 on a 12 + 4 epoch schedule, validated over the last 30% of each stage's epochs, so the
whole table fits in about 35 minutes on 2 CPU cores, two runs at a time with one thread each):

    labeled only            stage I with lambda = 0 (the unlabeled images only pass through BatchNorm)
    + raw foundation masks  stage I on the unfiltered annotator argmax (`calibrate --rule argmax`)
    + CP masks, stage I     stage I on conformal-filtered masks (`--mode paper`; `--mode crc --rule singleton`)
    + stage II              the full method: stage II from that stage I

Reported: best val mIoU over epochs (the anchors' protocol), mean and spread (min-max) over seeds,
and the pseudo-label quality of each mask variant. Rows that do not depend on the CP mode are trained
once. Finished runs are reused, so an interrupted benchmark continues where it stopped.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipeline import PROJECT_ROOT, config as cfg  # noqa: E402
from pipeline.atomic import write_text_atomic  # noqa: E402
from pipeline.calibrate import Settings, run_calibrate  # noqa: E402
from pipeline.logits import run_logits  # noqa: E402
from trainer.recipes import get_recipe  # noqa: E402
from trainer.stages import train_stage  # noqa: E402

WORLD = PROJECT_ROOT / "data" / "toy"
# alpha 0.05 for the paper mode: the paper's best on VOC. crc stays at 0.1: at 0.05 it needs >= 19 labeled images.
VARIANTS = {"raw": Settings(alpha=0.1, rule="argmax"), "paper": Settings(alpha=0.05, mode="paper"),
            "crc": Settings(alpha=0.1, mode="crc", rule="singleton")}


def row_name(variant: str) -> str:
    """What a mask variant is, read off its settings, e.g. "CP crc, singleton rule, alpha 0.1"."""
    settings = VARIANTS[variant]
    if settings.rule == "argmax":
        return "raw argmax"
    rule = "" if settings.rule == "paper" else f", {settings.rule} rule"
    return f"CP {settings.mode}{rule}, alpha {settings.alpha:g}"


def quiet(*args, **kwargs) -> None:
    """A logger that says nothing: the benchmark prints one line per finished run instead."""


def split_config(root: Path, n: int, variant: str):
    """The toy config for an n-labeled split, working in its own folder that shares one score store."""
    work = root / f"n{n}" / variant
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "logits.zarr").exists():
        (work / "logits.zarr").symlink_to(root / "logits.zarr")
    splits = WORLD / "splits" / str(n)
    return replace(cfg.load("toy"), labeled=splits / "labeled.txt", unlabeled=splits / "unlabeled.txt",
                   work_dir=work)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--splits", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, nargs=2, default=[12, 4], help="stage I and stage II epochs")
    parser.add_argument("--crop", type=int, default=64, help="training crop")
    parser.add_argument("--eval-from", type=float, default=0.7, help="validate only after this fraction of epochs")
    parser.add_argument("--jobs", type=int, default=2, help="trainings run side by side (one thread each)")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "work" / "bench")
    args = parser.parse_args()
    root = (args.out / "quality").resolve()  # the symlinks to the shared store must be absolute
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    # one score store for every train image of the toy world (each split's labeled + unlabeled)
    (root / "logits.zarr").parent.mkdir(parents=True, exist_ok=True)
    for n in args.splits:
        store_config = replace(split_config(root, n, "paper"), work_dir=root)
        for split in ("labeled", "unlabeled"):
            run_logits(store_config, split, warn=quiet)
    masks = {}
    for n in args.splits:
        for variant, settings in VARIANTS.items():
            record = run_calibrate(split_config(root, n, variant), settings, warn=quiet)
            unlabeled = record["diagnostics"]["unlabeled"]
            masks[n, variant] = {"kept": unlabeled["kept_fraction"],
                                 "miou_kept": unlabeled["quality"]["filtered_kept"]["miou"],
                                 "miou_raw": unlabeled["quality"]["raw"]["miou"],
                                 "acc_kept": unlabeled["quality"]["filtered_kept"]["pixel_accuracy"]}
    print(f"scores and calibrations ready after {time.perf_counter() - started:.0f}s", flush=True)

    # Two phases, because stage II starts from stage I's checkpoint; within a phase the runs are independent.
    # On a few CPU cores, `--jobs` runs side by side with one thread each outrun one run using every core.
    first, second = [], []
    for n in args.splits:
        for seed in range(args.seeds):
            _, base = get_recipe("toy", "folder", seed=seed, epochs=tuple(args.epochs), crop=args.crop,
                                 eval_from=args.eval_from, workers=0 if args.jobs > 1 else None)
            supervised = replace(base, lambda_start=0.0, lambda_end=0.0, lambda_schedule="constant")
            first += [(root, n, seed, "labeled", "raw", 1, supervised, f"labeled-only-seed{seed}"),
                      (root, n, seed, "raw", "raw", 1, base, f"seed{seed}")]
            for mode in ("paper", "crc"):
                first.append((root, n, seed, f"{mode}-I", mode, 1, base, f"seed{seed}"))
                second.append((root, n, seed, f"{mode}-II", mode, 2, base, f"seed{seed}"))
    results: dict = {}
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn"), initializer=torch.set_num_threads,
                             initargs=(threads,)) as pool:
        for phase in (first, second):
            for n, seed, key, best in pool.map(train_row, phase):
                results.setdefault((n, key), []).append(best)
                print(f"n={n} seed={seed} {key:9s} best val mIoU {100 * best:.1f} "
                      f"({time.perf_counter() - started:.0f}s)", flush=True)

    table = render(results, masks, args)
    took = time.perf_counter() - started
    text = table + (f"\n{args.seeds} seeds, epochs {args.epochs[0]} + {args.epochs[1]}, crop {args.crop}, "
                    f"validation from {args.eval_from:.0%} of the epochs, took {took / 60:.1f} min\n")
    write_text_atomic(args.out / "quality.md", text)
    print(text)


def train_row(job) -> tuple[int, int, str, float]:
    """One training run of the table (in a pool process); returns (n, seed, row key, best val mIoU)."""
    root, n, seed, key, variant, stage, recipe, run_name = job
    summary = train_stage(split_config(root, n, variant), "toy", recipe, stage, name=run_name, log=quiet)
    return n, seed, key, summary["best"]


def render(results: dict, masks: dict, args) -> str:
    def cell(values):
        v = 100 * np.array(values)
        return f"{v.mean():.1f} ({v.min():.1f}-{v.max():.1f})"

    lines = ["Toy world, val mIoU % (best epoch), mean over seeds (min-max).", "",
             "| labeled | mode | labeled only | + raw masks | + CP masks (stage I) | + stage II (full method) |",
             "|---|---|---|---|---|---|"]
    for n in args.splits:
        for mode in ("paper", "crc"):
            lines.append(f"| {n} | {row_name(mode)} | {cell(results[n, 'labeled'])} | {cell(results[n, 'raw'])} | "
                         f"{cell(results[n, f'{mode}-I'])} | {cell(results[n, f'{mode}-II'])} |")
    lines += ["", "Pseudo-labels of the unlabeled images against their ground truth (mIoU %, pixel acc. %):", "",
              "| labeled | masks | kept pixels % | mIoU % on kept | pixel acc. % on kept |", "|---|---|---|---|---|"]
    for n in args.splits:
        for variant in VARIANTS:
            m = masks[n, variant]
            lines.append(f"| {n} | {row_name(variant)} | {100 * m['kept']:.1f} | {100 * m['miou_kept']:.1f} | "
                         f"{100 * m['acc_kept']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
