"""`make bench-student`: the paper's regime on real images, a pretrained student and annotators of several strengths.

ConformalSAM's claim: a foundation model's raw masks can hurt a good student, and conformal filtering turns them
into a gain. bench-real's tiny from-scratch student is far weaker than its annotator; here the student starts
from pretrained weights and the annotators range from helpful to harmful:

    student     ESPNetv2 (benchmarks/real/espnetv2_pascal.py, EdgeNets' own code from the user's checkout),
                initialised from EdgeNets' PASCAL VOC segmentation weights (another domain, another label set:
                it has never seen a street), its classifier re-initialised for CamVid's 11 classes. Never from
                Cityscapes weights: those are the annotators.
    annotators  ESPNetv2 trained on Cityscapes at several widths (benchmarks/real/espnetv2_city.py), zero-shot
                on CamVid through the Cityscapes -> CamVid class map of the camvid presets; each one's raw val
                mIoU is measured.

Per annotator and labeled split, over seeds (CamVid val, 101 images; CamVid test is never read):

    labeled only        stage I with lambda = 0 (annotator-independent: trained once per split and seed)
    + raw masks         stage I on the annotator's argmax           + raw, stage II   the control
    + CP crc            stage I on CRC masks, singleton rule, alpha 0.1              + stage II
    + CP paper          stage I on the paper rule's masks at the alpha the noise-5% rule picks from calibrate's
                        held-out pseudo-labels of the labeled images (before any training)   + stage II

Every run reports the best val epoch's mIoU and the last epoch's (choosing the epoch on 101 val images is
itself noisy). Finished runs are reused, so an interrupted benchmark continues where it stopped.
Writes <out>/student.md (tables) and student.json (every figure).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
from ablation import World, calibrate_variant, make_store, quiet, recipes, row_name, split_config, train_all  # noqa: E402
from pipeline import PROJECT_ROOT, config as cfg  # noqa: E402
from pipeline.stage1.alpha_rules import choose  # noqa: E402
from pipeline.atomic import write_text_atomic  # noqa: E402
from pipeline.stage1.calibrate import Settings, accumulate, assign_folds  # noqa: E402
from pipeline.data.datasets import Dataset  # noqa: E402
from pipeline.stage1.held_out import held_out  # noqa: E402
from pipeline.stage0.logits import run_logits  # noqa: E402
from pipeline.metrics import mean_iou, pixel_accuracy  # noqa: E402
from pipeline.stage1.rawscore import raw_confusion  # noqa: E402
from pipeline.stage0.store import LogitsStore  # noqa: E402

REAL = PROJECT_ROOT / "benchmarks" / "real"
WEIGHTS = PROJECT_ROOT / "data" / "weights"
EDGENETS = PROJECT_ROOT / "third_party" / "EdgeNets"
# name -> (factory in benchmarks/real, its Cityscapes weights in data/weights): ESPNetv2 at four widths; DiCENet
# 0.5, the weakest of the repository's Cityscapes networks measured here (44.7 val mIoU), is not in the default set
ANNOTATORS = {f"s{w}": (f"espnetv2_city.py:{'build' if w == '2.0' else 'build_s' + w.replace('.', '_')}",
                        f"espnetv2_s_{w}_city_1024x512.pth") for w in ("2.0", "1.5", "1.0", "0.5")}
ANNOTATORS["dicenet0.5"] = ("dicenet_city.py:build", "dicenet_s_0.5_city_1024x512.pth")
PAPER_ALPHAS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)  # the grid the noise-5% rule picks the paper alpha from
PAPER_RULE = "noise-5%"


def student_fields(width: str, lr: float, head_lr_mult: float) -> dict:
    return {"model": f"{REAL / 'espnetv2_pascal.py'}:build" + ("" if width == "1.0" else f"_s{width.replace('.', '_')}"),
            "model_code": EDGENETS, "init_weights": WEIGHTS / f"espnetv2_s_{width}_pascal_384x384.pth", "lr": lr,
            "head_lr_mult": head_lr_mult}


def annotator_config(name: str, split: str) -> cfg.Config:
    """The camvid preset of the split, annotated by the Cityscapes network ``name``."""
    factory, weights = ANNOTATORS[name]
    return replace(cfg.load(f"camvid-{split}"), factory=f"{REAL / factory}", weights=WEIGHTS / weights)


def annotator_world(name: str, args, variants: dict) -> World:
    return World(name=f"student/{name}", title=f"CamVid, Cityscapes {name} annotator",
                 config=partial(annotator_config, name),
                 splits=tuple(args.splits), recipe="camvid-tiny", variants=variants, plugin="crc",
                 epochs=tuple(args.epochs), crop=args.crop, eval_from=args.eval_from, scale=0.5,
                 student=student_fields(args.student_width, args.lr, args.head_lr_mult))


def annotator_quality(world: World, root: Path, split: str) -> dict:
    """The annotator's raw argmax against CamVid val (`conformalsam eval --scores`)."""
    config = replace(world.config(split), work_dir=root)
    run_logits(config, "val", scale=world.scale, warn=quiet, info=quiet)
    dataset = Dataset(config)
    conf = raw_confusion(LogitsStore(root / "logits.zarr"), dataset, dataset.split("val"))
    return {"val_miou": mean_iou(conf), "val_pixel_accuracy": pixel_accuracy(conf)}


def paper_alpha(world: World, root: Path, split: str) -> dict:
    """The paper rule's alpha, picked by the noise-5% rule from the labeled images' held-out pseudo-labels."""
    settings = Settings(alpha=PAPER_ALPHAS[0], mode="paper", rule="paper")
    config = split_config(world, root, split, "raw")
    dataset, store = Dataset(config), LogitsStore(config.work_dir / "logits.zarr")
    labeled = list({s.id: s for s in dataset.split("labeled")}.values())
    hist = accumulate(store, dataset, labeled, settings, jobs=2)
    held = held_out(store, dataset, labeled, assign_folds(labeled, settings), hist, "paper", "paper", PAPER_ALPHAS, 2)
    pick = choose(held, PAPER_RULE)
    return {"alpha": held.alphas[pick], "top1_accuracy": held.top1_accuracy,
            "grid": {f"{a:g}": {"kept": float(k), "accuracy": float(c)}
                     for a, k, c in zip(held.alphas, held.kept, held.accuracy)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotators", nargs="+", default=["s2.0", "s1.5", "s1.0"], choices=sorted(ANNOTATORS))
    parser.add_argument("--splits", nargs="+", default=["1_16"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, nargs=2, default=[3, 1], help="stage I and II epochs")
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--eval-from", type=float, default=0.0, help="validate only after this fraction of epochs")
    parser.add_argument("--student-width", default="1.0", choices=["0.5", "1.0", "2.0"])
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW, at a batch of 8")
    parser.add_argument("--head-lr-mult", type=float, default=1.0)
    parser.add_argument("--stage1-only", action="store_true", help="no stage II rows (a pilot)")
    parser.add_argument("--jobs", type=int, default=2, help="trainings run side by side (one thread each)")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "work" / "bench")
    args = parser.parse_args()
    torch.set_num_threads(2)
    started = time.perf_counter()

    worlds, roots, annotators, variants = {}, {}, {}, {}
    for name in args.annotators:
        base = {"raw": Settings(alpha=0.1, rule="argmax"), "crc": Settings(alpha=0.1, mode="crc", rule="singleton")}
        world = annotator_world(name, args, base)
        root = (args.out / world.name).resolve()
        make_store(world, root, args.splits)
        annotators[name] = annotator_quality(world, root, args.splits[0])
        for split in args.splits:  # the paper alpha comes from the labeled set, before any training
            chosen = paper_alpha(world, root, split)
            annotators[name].setdefault("paper", {})[split] = chosen
            variants[name, split] = {**base, "paper": Settings(alpha=chosen["alpha"], mode="paper", rule="paper")}
        worlds[name], roots[name] = world, root
        print(f"annotator {name}: val mIoU {100 * annotators[name]['val_miou']:.1f}, paper alpha "
              f"{ {s: annotators[name]['paper'][s]['alpha'] for s in args.splits} } ({time.perf_counter() - started:.0f}s)",
              flush=True)

    masks = {}
    for (name, split), chosen in variants.items():
        world = replace(worlds[name], variants=chosen)
        worlds[name, split] = world
        for variant, settings in chosen.items():
            masks[name, split, variant] = calibrate_variant(world, roots[name], split, variant, settings)
    print(f"scores and calibrations ready after {time.perf_counter() - started:.0f}s", flush=True)

    first, second = [], []
    for split in args.splits:
        for seed in range(args.seeds):
            reference = args.annotators[0]  # labeled only ignores the masks: trained once, in its folder
            base, supervised = recipes(worlds[reference, split], args, seed)
            first.append((worlds[reference, split], roots[reference], split, seed, "labeled", "raw", 1, supervised,
                          f"labeled-only-seed{seed}", "self"))
            for name in args.annotators:
                world, root = worlds[name, split], roots[name]
                for variant in world.variants:
                    first.append((world, root, split, seed, f"{name}:{variant}-I", variant, 1, base, f"seed{seed}",
                                  "self"))
                    second.append((world, root, split, seed, f"{name}:{variant}-II", variant, 2, base, f"seed{seed}",
                                   "self"))
    last: dict = {}
    best = train_all([first] if args.stage1_only else [first, second], args.jobs, started, last)
    took = (time.perf_counter() - started) / 60
    report = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "student": {k: str(v) for k, v in student_fields(args.student_width, args.lr, args.head_lr_mult).items()},
              "annotators": annotators, "minutes": took,
              "masks": {f"{n}|{s}|{v}": {k: m[k] for k in ("kept", "acc_kept", "miou_kept", "miou_raw")}
                        for (n, s, v), m in masks.items()},
              "runs": {f"{s}|{k}": {"best": best[s, k], "last": last[s, k]} for s, k in best}}
    write_text_atomic(args.out / "student.json", json.dumps(report, indent=1) + "\n")
    text = render(report, args, variants) + f"\n{args.seeds} seeds, epochs {args.epochs[0]} + {args.epochs[1]}, crop " \
        f"{args.crop}, student ESPNetv2 s{args.student_width} from PASCAL weights, took {took:.1f} min\n"
    write_text_atomic(args.out / "student.md", text)
    print(text)


def spread(values) -> str:
    v = 100 * np.array(values)
    return f"{v.mean():.1f} ({v.min():.1f}-{v.max():.1f})"


def versus(a, b) -> str:
    """Mean difference of a over b, with '>' / '<' when the seed ranges do not overlap (beyond the spread)."""
    a, b = 100 * np.array(a), 100 * np.array(b)
    mark = " >" if a.min() > b.max() else " <" if a.max() < b.min() else ""
    return f"{a.mean() - b.mean():+.1f}{mark}"


def render(report: dict, args, variants: dict) -> str:
    runs = report["runs"]
    lines = ["Annotators, zero-shot on CamVid val (raw argmax), and the paper alpha picked from the labeled set "
             f"(rule {PAPER_RULE} over {', '.join(f'{a:g}' for a in PAPER_ALPHAS)}; held-out kept % / accuracy %):", "",
             "| annotator | val mIoU % | val pixel acc. % | " + " | ".join(f"paper alpha ({s})" for s in args.splits)
             + " |", "|---|---|---|" + "---|" * len(args.splits)]
    for name, a in report["annotators"].items():
        picks = []
        for split in args.splits:
            p = a["paper"][split]
            g = p["grid"][f"{p['alpha']:g}"]
            picks.append(f"{p['alpha']:g} ({100 * g['kept']:.0f} / {100 * g['accuracy']:.1f})")
        lines.append(f"| {name} | {100 * a['val_miou']:.1f} | {100 * a['val_pixel_accuracy']:.1f} | " + " | ".join(picks)
                     + " |")
    stages = ("I",) if args.stage1_only else ("I", "II")
    for which in ("best", "last"):
        title = "best val epoch" if which == "best" else "last epoch"
        lines += ["", f"Student val mIoU % ({title}), mean over seeds (min-max):", "",
                  "| labeled | annotator | labeled only | + raw | " + ("+ raw, stage II | " if "II" in stages else "") +
                  " | ".join(f"+ {v} {st}" for v in ("crc", "paper") for st in stages) + " |",
                  "|---|---|---|---|" + "---|" * (len(stages) * 3 - 1)]
        for split in args.splits:
            labeled = runs[f"{split}|labeled"][which]
            for name in report["annotators"]:
                cells = [spread(labeled), spread(runs[f"{split}|{name}:raw-I"][which])]
                cells += [spread(runs[f"{split}|{name}:raw-II"][which])] if "II" in stages else []
                cells += [spread(runs[f"{split}|{name}:{v}-{st}"][which]) for v in ("crc", "paper") for st in stages]
                lines.append(f"| {split} | {name} | " + " | ".join(cells) + " |")
    lines += ["", "Differences of means in points (best val epoch / last epoch); '>' or '<': the seed ranges do not "
              "overlap (beyond the seed spread):", "",
              "| labeled | annotator | raw - labeled only | crc I - raw | crc I - labeled only | paper I - raw | "
              "paper I - labeled only" + (" | crc II - raw II | paper II - raw II" if "II" in stages else "") + " |",
              "|---|---|---|---|---|---|---|" + ("---|---|" if "II" in stages else "")]
    for split in args.splits:
        for name in report["annotators"]:
            def r(key, which):
                return runs[f"{split}|{key}"][which]
            pairs = [(f"{name}:raw-I", "labeled"), (f"{name}:crc-I", f"{name}:raw-I"), (f"{name}:crc-I", "labeled"),
                     (f"{name}:paper-I", f"{name}:raw-I"), (f"{name}:paper-I", "labeled")]
            pairs += [(f"{name}:crc-II", f"{name}:raw-II"), (f"{name}:paper-II", f"{name}:raw-II")] if "II" in stages else []
            lines.append(f"| {split} | {name} | " + " | ".join(
                f"{versus(r(a, 'best'), r(b, 'best'))} / {versus(r(a, 'last'), r(b, 'last'))}" for a, b in pairs) + " |")
    lines += ["", "Pseudo-labels of the unlabeled train images against their ground truth:", "",
              "| labeled | annotator | masks | kept pixels % | mIoU % on kept | pixel acc. % on kept |",
              "|---|---|---|---|---|---|"]
    for (name, split), chosen in variants.items():
        for variant, settings in chosen.items():
            m = report["masks"][f"{name}|{split}|{variant}"]
            lines.append(f"| {split} | {name} | {row_name(settings)} | {100 * m['kept']:.1f} | {100 * m['miou_kept']:.1f} "
                         f"| {100 * m['acc_kept']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
