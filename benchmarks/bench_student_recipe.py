"""`make bench-student-recipe`: what caps the labeled-only student, found by measurement.

bench-student's student (ESPNetv2 s1.0 from PASCAL VOC weights, crops of 128 from images scaled 0.5-1x, AdamW lr
3e-3) stays near 41 val mIoU on CamVid whatever the number of labels, below every annotator. This trains that
student on labeled images only (stage I with lambda = 0: bench-student's "labeled only" row, the unlabeled images
passing through BatchNorm) for each recipe of a grid that moves one lever at a time (crop, width, scale range,
steps, learning rate, head multiplier) and then combines the levers that helped, and tables the best and last
epoch's CamVid val mIoU against what the run cost: the seconds it spent training and validating on one CPU
thread (two runs side by side on 2 cores). CamVid test is never read.

Writes <out>/student-recipe.md and .json; finished runs are reused, so an interrupted sweep continues.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
from ablation import calibrate_variant, make_store, recipes, train_all  # noqa: E402
from bench_student import ANNOTATORS, annotator_world  # noqa: E402
from pipeline import PROJECT_ROOT  # noqa: E402
from pipeline.atomic import write_text_atomic  # noqa: E402
from pipeline.stage1.calibrate import Settings  # noqa: E402

# bench-student's recipe, at 8 epochs: every entry of the grid changes some of these
BASE = {"width": "1.0", "crop": 128, "scale": (0.5, 1.0), "epochs": 8, "lr": 3e-3, "head": 1.0, "weights": "none"}
GRID = {
    "base": {},
    "crop256": {"crop": 256},
    "s2.0": {"width": "2.0"},
    "scale0.75-1.25": {"scale": (0.75, 1.25)},
    "lr1e-2": {"lr": 1e-2},
    "head10": {"lr": 1e-3, "head": 10.0},
    "epochs24": {"epochs": 24},
    # the first round left five classes (Pole, SignSymbol, Fence, Pedestrian, Bicyclist) at 0 IoU: weigh them up
    "mfb": {"weights": "median-frequency"},
    "mfb-epochs16": {"weights": "median-frequency", "epochs": 16},
    # median frequency brings the rare classes up and costs the common ones (Building 76 -> 44): milder weights, longer
    "enet-epochs16": {"weights": "enet", "epochs": 16},
    "mfb-epochs24": {"weights": "median-frequency", "epochs": 24},
}


def spec(name: str) -> dict:
    return {**BASE, **GRID[name]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=list(GRID), choices=list(GRID))
    parser.add_argument("--split", default="1_2")
    parser.add_argument("--annotator", default="s1.0", choices=sorted(ANNOTATORS),
                        help="whose score store and raw masks the run folders use (lambda = 0: not learned from)")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--eval-from", type=float, default=0.5, help="validate only after this fraction of epochs")
    parser.add_argument("--jobs", type=int, default=2, help="trainings run side by side (one thread each)")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "work" / "bench")
    args = parser.parse_args()
    torch.set_num_threads(2)
    started = time.perf_counter()

    jobs, specs = [], {}
    for name in args.recipes:
        s = specs[name] = spec(name)
        run_args = argparse.Namespace(splits=[args.split], epochs=[s["epochs"], 1], crop=s["crop"],
                                      eval_from=args.eval_from, student_width=s["width"], lr=s["lr"],
                                      head_lr_mult=s["head"], scale_range=s["scale"], class_weights=s["weights"],
                                      jobs=args.jobs)
        world = annotator_world(args.annotator, run_args, {"raw": Settings(alpha=0.1, rule="argmax")})
        root = (args.out / world.name).resolve()
        if not jobs:  # the store and the raw masks the labeled-only runs' folder needs (the same for every recipe)
            make_store(world, root, [args.split])
            calibrate_variant(world, root, args.split, "raw", world.variants["raw"])
        for seed in range(args.seeds):
            _, supervised = recipes(world, run_args, seed)
            jobs.append((world, root, args.split, seed, name, "raw", 1, supervised, f"recipe-{name}-seed{seed}",
                         "self"))
    runs: dict = {}
    train_all([jobs], args.jobs, started, runs)
    report = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "recipes": {n: {**specs[n], "runs": runs[args.split, n]} for n in args.recipes}}
    write_text_atomic(args.out / "student-recipe.json", json.dumps(report, indent=1) + "\n")
    text = render(report, args) + f"\ntook {(time.perf_counter() - started) / 60:.1f} min\n"
    write_text_atomic(args.out / "student-recipe.md", text)
    print(text)


def render(report: dict, args) -> str:
    lines = [f"Labeled-only student on CamVid {args.split}, val mIoU % (CamVid val, 101 images), ESPNetv2 from "
             f"PASCAL weights, AdamW; {args.seeds} seed(s), mean (min-max); seconds: one CPU thread per run, "
             "training + validation:", "",
             "| recipe | width | crop | scale | epochs (steps) | lr | head x | class weights | best val mIoU | last epoch "
             "| best epoch | seconds |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in report["recipes"].items():
        runs = r["runs"]

        def cell(key):
            v = [100 * x[key] for x in runs]
            return f"{sum(v) / len(v):.1f}" + (f" ({min(v):.1f}-{max(v):.1f})" if len(v) > 1 else "")
        seconds = sum(x["seconds"] for x in runs) / len(runs)
        lines.append(f"| {name} | s{r['width']} | {r['crop']} | {r['scale'][0]:g}-{r['scale'][1]:g} | {r['epochs']} "
                     f"({runs[0]['steps']}) | {r['lr']:g} | {r['head']:g} | {r['weights']} | {cell('best')} | {cell('last')} | "
                     f"{', '.join(str(x['best_epoch']) for x in runs)} | {seconds:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
