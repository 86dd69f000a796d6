"""The method's ablation table, for any data set: the machinery of `make bench-quality` (the toy world)
and `make bench-real` (CamVid with a Cityscapes-trained annotator).

Per labeled-split size, every stage I row trains the same model for the same number of steps, and every
stage II row adds the same stage II epochs:

    labeled only            stage I with lambda = 0 (the unlabeled images only pass through BatchNorm)
    + raw foundation masks  stage I on the unfiltered annotator argmax (`calibrate --rule argmax`)
    + raw, stage II         the control for stage II: its extra epochs after the raw-mask stage I
    + CP masks, stage I     stage I on conformal-filtered masks, one row per CP variant
    + stage II              the full method: stage II (self-training) from that stage I

and the plug-in question, with UniMatch as stage II (`--method unimatch`), same stage II epochs:

    labeled only -> UniMatch   UniMatch from the labeled-only stage I (no foundation masks at all)
    CP stage I -> UniMatch     UniMatch from the CP stage I of the world's `plugin` variant

Reported: best val mIoU over epochs (the anchors' protocol), mean and spread (min-max) over seeds, and the
pseudo-label quality of each mask variant. One score store serves every split (all of them draw from the
same train images); rows that do not depend on the CP variant are trained once; finished runs are reused,
so an interrupted benchmark continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pipeline import PROJECT_ROOT
from pipeline.atomic import write_text_atomic
from pipeline.stage1.calibrate import Settings, run_calibrate
from pipeline.config import Config
from pipeline.stage0.logits import run_logits
from pipeline.ui import percent
from trainer.recipes import get_recipe
from trainer.stages import run_dir, train_stage


@dataclass(frozen=True)
class World:
    """What the table is made of: a config per split, the recipe, the mask variants, the defaults."""

    name: str  # the output's file name and the work folder under --out
    title: str  # the table's first line
    config: Callable[[str], Config]  # split label (e.g. "16", "1_16") -> its config
    splits: tuple[str, ...]
    recipe: str
    variants: dict[str, Settings]  # "raw" first, then the CP variants (a stage II row each)
    plugin: str  # the CP variant whose stage I UniMatch continues from
    epochs: tuple[int, int]
    crop: int
    eval_from: float
    scale: float | None = None  # stored score resolution (`logits --scale`); None: the model's own
    student: dict = field(default_factory=dict)  # recipe fields over the named recipe's (e.g. model, init_weights)


def row_name(settings: Settings) -> str:
    """What a mask variant is, read off its settings, e.g. "CP crc, singleton rule, alpha 0.1"."""
    if settings.rule == "argmax":
        return "raw argmax"
    rule = "" if settings.rule == "paper" else f", {settings.rule} rule"
    return f"CP {settings.mode}{rule}, alpha {settings.alpha:g}"


def quiet(*args, **kwargs) -> None:
    """A logger that says nothing: the benchmark prints one line per finished run instead."""


def split_config(world: World, root: Path, split: str, variant: str) -> Config:
    """The split's config, working in its own folder that shares the one score store."""
    work = root / split / variant
    work.mkdir(parents=True, exist_ok=True)
    link = work / "logits.zarr"
    if not link.is_symlink() and not link.exists():  # (a link to a store not there, as on the GPU kit's machine)
        link.symlink_to(root / "logits.zarr")
    return replace(world.config(split), work_dir=work)


def parse(world: World, doc: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--splits", nargs="+", default=list(world.splits))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, nargs=2, default=list(world.epochs), help="stage I and II epochs")
    parser.add_argument("--crop", type=int, default=world.crop, help="training crop")
    parser.add_argument("--eval-from", type=float, default=world.eval_from,
                        help="validate only after this fraction of epochs")
    parser.add_argument("--jobs", type=int, default=2, help="trainings run side by side (one thread each)")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "work" / "bench")
    return parser.parse_args()


def run(world: World, args: argparse.Namespace) -> str:
    """Scores, calibrations, every training run, the table (written to <out>/<name>.md); returns it."""
    root = (args.out / world.name).resolve()  # the symlinks to the shared store must be absolute
    started = time.perf_counter()
    make_store(world, root, args.splits)
    masks = {(split, variant): calibrate_variant(world, root, split, variant, settings)
             for split in args.splits for variant, settings in world.variants.items()}
    print(f"scores and calibrations ready after {time.perf_counter() - started:.0f}s", flush=True)

    # Two phases, because stage II starts from stage I's checkpoint; within a phase the runs are independent.
    cp = [v for v in world.variants if v != "raw"]
    first, second = [], []
    for split in args.splits:
        for seed in range(args.seeds):
            base, supervised = recipes(world, args, seed)
            first += [(world, root, split, seed, "labeled", "raw", 1, supervised, f"labeled-only-seed{seed}", "self"),
                      (world, root, split, seed, "raw", "raw", 1, base, f"seed{seed}", "self")]
            second += [(world, root, split, seed, "raw-II", "raw", 2, base, f"seed{seed}", "self"),
                       (world, root, split, seed, "labeled-UM", "raw", 2, base, f"labeled-only-seed{seed}",
                        "unimatch"),
                       (world, root, split, seed, f"{world.plugin}-UM", world.plugin, 2, base, f"seed{seed}",
                        "unimatch")]
            for variant in cp:
                first.append((world, root, split, seed, f"{variant}-I", variant, 1, base, f"seed{seed}", "self"))
                second.append((world, root, split, seed, f"{variant}-II", variant, 2, base, f"seed{seed}", "self"))
    results = train_all([first, second], args.jobs, started)
    table = render(world, results, masks, args)
    took = time.perf_counter() - started
    text = table + (f"\n{args.seeds} seeds, epochs {args.epochs[0]} + {args.epochs[1]}, crop {args.crop}, "
                    f"validation from {args.eval_from:.0%} of the epochs, took {took / 60:.1f} min\n")
    write_text_atomic(args.out / f"{world.name}.md", text)
    print(text)
    return text


def make_store(world: World, root: Path, splits) -> None:
    """The one score store every split's folder links to (stage 0 skips images it already holds)."""
    root.mkdir(parents=True, exist_ok=True)
    for split in splits:
        store_config = replace(world.config(split), work_dir=root)
        for part in ("labeled", "unlabeled"):
            run_logits(store_config, part, scale=world.scale, warn=quiet, info=quiet)


def calibrate_variant(world: World, root: Path, split: str, variant: str, settings: Settings) -> dict:
    """Stage 1 for one mask variant of one split; returns what its masks are worth against the ground truth
    of the unlabeled images (which the benchmark has and a user would not)."""
    record = run_calibrate(split_config(world, root, split, variant), settings, warn=quiet)
    unlabeled = record["diagnostics"]["unlabeled"]
    quality = unlabeled["quality"]
    return {"kept": unlabeled["kept_fraction"], "miou_kept": quality["filtered_kept"]["miou"],
            "miou_raw": quality["raw"]["miou"], "acc_kept": quality["filtered_kept"]["pixel_accuracy"],
            "per_class": {c: (unlabeled["per_class"][c]["kept_fraction"], quality["per_class_precision"][c],
                              quality["per_class_iou"][c]["raw"], quality["per_class_iou"][c]["filtered_kept"])
                          for c in record["classes"]}}


def recipes(world: World, args: argparse.Namespace, seed: int):
    """(the stage I recipe with the foundation masks, the same recipe with lambda = 0: labeled only)."""
    _, base = get_recipe(world.recipe, "folder", **{**world.student, "seed": seed, "epochs": tuple(args.epochs),
                         "crop": args.crop, "eval_from": args.eval_from, "workers": 0 if args.jobs > 1 else None})
    return base, replace(base, lambda_start=0.0, lambda_end=0.0, lambda_schedule="constant")


def train_all(phases: list[list[tuple]], jobs: int, started: float, runs: dict | None = None) -> dict:
    """Every job of every phase (a phase may start from the previous one's checkpoints); returns
    {(split, row key): [best val mIoU per job, in job order]} and fills ``runs`` alike with each job's record
    (best, last epoch's mIoU, best epoch, seconds; see `train_row`).
    On a few CPU cores, ``jobs`` runs side by side with one thread each outrun one run using every core."""
    results: dict = {}
    threads = max(1, (os.cpu_count() or 1) // jobs)
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), initializer=torch.set_num_threads,
                             initargs=(threads,)) as pool:
        for phase in phases:
            for split, seed, key, run in pool.map(train_row, phase):
                results.setdefault((split, key), []).append(run["best"])
                if runs is not None:
                    runs.setdefault((split, key), []).append(run)
                print(f"split {split} seed={seed} {key:12s} best val mIoU {100 * run['best']:.1f} "
                      f"({time.perf_counter() - started:.0f}s)", flush=True)
    return results


def train_row(job) -> tuple[str, int, str, dict]:
    """One training run of the table (in a pool process); returns (split, seed, row key, record): the record holds
    the best val mIoU and the last epoch's, the best epoch and its per-class IoU, the steps, and the seconds the run
    spent training and validating (read from its metrics, so a reused run reports what it cost when it ran)."""
    world, root, split, seed, key, variant, stage, recipe, run_name, method = job
    config = split_config(world, root, split, variant)
    out = run_dir(config, run_name, stage, method)
    # a run an interruption cut short continues (exactly, on the CPU); a finished one is reused
    summary = train_stage(config, world.recipe, recipe, stage, name=run_name, log=quiet, method=method,
                          resume=(out / "last.pt").exists())
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    best = max((e for e in epochs if e.get("miou") is not None), key=lambda e: e["miou"], default={})
    return split, seed, key, {
        "best": summary["best"], "last": summary["last"], "epochs": len(epochs), "steps": epochs[-1]["step"],
        "best_epoch": best.get("epoch"), "best_iou": best.get("iou"),
        "seconds": sum(e["seconds"] + e.get("val_seconds", 0.0) for e in epochs)}


def render(world: World, results: dict, masks: dict, args) -> str:
    def cell(values):
        v = 100 * np.array(values)
        return f"{v.mean():.1f} ({v.min():.1f}-{v.max():.1f})"

    lines = [f"{world.title}, val mIoU % (best epoch), mean over seeds (min-max).", "",
             "| labeled | masks | labeled only | + raw masks | + raw, stage II | + CP masks (stage I) "
             "| + stage II (full method) |", "|---|---|---|---|---|---|---|"]
    for split in args.splits:
        for variant in (v for v in world.variants if v != "raw"):
            lines.append(f"| {split} | {row_name(world.variants[variant])} | {cell(results[split, 'labeled'])} | "
                         f"{cell(results[split, 'raw'])} | {cell(results[split, 'raw-II'])} | "
                         f"{cell(results[split, f'{variant}-I'])} | "
                         f"{cell(results[split, f'{variant}-II'])} |")
    plugin = row_name(world.variants[world.plugin])
    lines += ["", f"UniMatch as stage II (the plug-in question), CP = {plugin}; UniMatch's loss under the "
              "trainer's lambda(t), which stage II runs at about 0.15 -> 0.10 (UniMatch itself weighs 1:1):", "",
              "| labeled | labeled only | labeled only -> UniMatch | CP stage I | CP stage I -> UniMatch | "
              "CP stage I -> self-training |", "|---|---|---|---|---|---|"]
    for split in args.splits:
        lines.append(f"| {split} | {cell(results[split, 'labeled'])} | {cell(results[split, 'labeled-UM'])} | "
                     f"{cell(results[split, f'{world.plugin}-I'])} | {cell(results[split, f'{world.plugin}-UM'])} | "
                     f"{cell(results[split, f'{world.plugin}-II'])} |")
    lines += ["", "Pseudo-labels of the unlabeled images against their ground truth (mIoU %, pixel acc. %):", "",
              "| labeled | masks | kept pixels % | mIoU % on kept | pixel acc. % on kept |", "|---|---|---|---|---|"]
    for split in args.splits:
        for variant, settings in world.variants.items():
            m = masks[split, variant]
            lines.append(f"| {split} | {row_name(settings)} | {100 * m['kept']:.1f} | {100 * m['miou_kept']:.1f} | "
                         f"{100 * m['acc_kept']:.1f} |")
    cp = [v for v in world.variants if v != "raw"]
    for split in args.splits:
        lines += ["", f"Per class, labeled split {split}: the raw argmax's IoU, then for each CP variant the share "
                  "of the class's raw-argmax pixels kept, the precision of what is kept, and its IoU on kept pixels "
                  "(%):", "",
                  "| class | raw IoU | " + " | ".join(f"{row_name(world.variants[v])}: kept / precision / IoU"
                                                      for v in cp) + " |", "|---|---|" + "---|" * len(cp)]
        for c, (_, _, raw_iou, _) in masks[split, cp[0]]["per_class"].items():
            kept = [masks[split, v]["per_class"][c] for v in cp]  # (kept, precision, raw IoU, kept IoU)
            cells = [" / ".join(percent(x) for x in (k[0], k[1], k[3])) for k in kept]
            lines.append(f"| {c} | {percent(raw_iou)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
