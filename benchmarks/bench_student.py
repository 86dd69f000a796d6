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
from pipeline.ui import percent  # noqa: E402
from trainer.recipes import CLASS_WEIGHTS  # noqa: E402
from pipeline import PROJECT_ROOT, config as cfg  # noqa: E402
from pipeline.stage1.alpha_rules import choose  # noqa: E402
from pipeline.atomic import write_text_atomic  # noqa: E402
from pipeline.stage1.calibrate import Settings, accumulate, assign_folds  # noqa: E402
from pipeline.data.datasets import Dataset  # noqa: E402
from pipeline.stage1.held_out import held_out  # noqa: E402
from pipeline.stage0.logits import run_logits  # noqa: E402
from pipeline.metrics import iou_per_class, mean_iou, pixel_accuracy  # noqa: E402
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
RAW = Settings(alpha=0.1, rule="argmax")
# the CP variants; "paper" takes its alpha from the labeled set (paper_alpha), per annotator and split
CP = {"crc": Settings(alpha=0.1, mode="crc", rule="singleton"), "mondrian": Settings(alpha=0.1, mode="mondrian",
                                                                                      rule="singleton"),
      "paper": None}


def student_fields(args) -> dict:
    """The recipe fields of the student the arguments describe (over the camvid-tiny recipe's)."""
    width = args.student_width
    return {"model": f"{REAL / 'espnetv2_pascal.py'}:build" + ("" if width == "1.0" else f"_s{width.replace('.', '_')}"),
            "model_code": EDGENETS, "init_weights": WEIGHTS / f"espnetv2_s_{width}_pascal_384x384.pth", "lr": args.lr,
            "head_lr_mult": args.head_lr_mult, "scale_range": tuple(args.scale_range),
            "class_weights": args.class_weights}


def annotator_config(name: str, split: str) -> cfg.Config:
    """The camvid preset of the split, annotated by the Cityscapes network ``name``."""
    factory, weights = ANNOTATORS[name]
    return replace(cfg.load(f"camvid-{split}"), factory=f"{REAL / factory}", weights=WEIGHTS / weights)


def annotator_world(name: str, args, variants: dict) -> World:
    return World(name=f"student/{name}", title=f"CamVid, Cityscapes {name} annotator",
                 config=partial(annotator_config, name),
                 splits=tuple(args.splits), recipe="camvid-tiny", variants=variants, plugin="crc",
                 epochs=tuple(args.epochs), crop=args.crop, eval_from=args.eval_from, scale=0.5,
                 student=student_fields(args))


def annotator_quality(world: World, root: Path, split: str) -> dict:
    """The annotator's raw argmax against CamVid val (`conformalsam eval --scores`)."""
    config = replace(world.config(split), work_dir=root)
    run_logits(config, "val", scale=world.scale, warn=quiet, info=quiet)
    dataset = Dataset(config)
    conf = raw_confusion(LogitsStore(root / "logits.zarr"), dataset, dataset.split("val"))
    return {"val_miou": mean_iou(conf), "val_pixel_accuracy": pixel_accuracy(conf),
            "val_iou": dict(zip(dataset.classes, map(float, iou_per_class(conf))))}


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


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotators", nargs="+", default=["s2.0", "s1.5", "s1.0"], choices=sorted(ANNOTATORS))
    parser.add_argument("--splits", nargs="+", default=["1_16"], choices=["1_16", "1_8", "1_4", "1_2"])
    parser.add_argument("--variants", nargs="+", default=["crc", "paper"], choices=list(CP),
                        help="the CP masks trained on, besides labeled only and the raw masks")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, nargs=2, default=[3, 1], help="stage I and II epochs")
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--scale-range", type=float, nargs=2, default=[0.5, 1.0], help="training images scaled by")
    parser.add_argument("--eval-from", type=float, default=0.0, help="validate only after this fraction of epochs")
    parser.add_argument("--student-width", default="1.0", choices=["0.5", "1.0", "1.5", "2.0"])
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW, at a batch of 8")
    parser.add_argument("--head-lr-mult", type=float, default=1.0)
    parser.add_argument("--class-weights", default="none", choices=CLASS_WEIGHTS)
    parser.add_argument("--stage1-only", action="store_true", help="no stage II rows")
    parser.add_argument("--jobs", type=int, default=2, help="trainings run side by side (one thread each)")
    parser.add_argument("--name", default="student",
                        help="the tables' file name (<out>/<name>.md, .json) and the runs' folder prefix")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "work" / "bench")
    return parser.parse_args()


def main() -> None:
    args = parse()
    torch.set_num_threads(2)
    started = time.perf_counter()

    worlds, roots, annotators, variants = {}, {}, {}, {}
    for name in args.annotators:
        world = annotator_world(name, args, {})
        root = (args.out / world.name).resolve()  # one score store per annotator, whatever the recipe
        make_store(world, root, args.splits)
        annotators[name] = annotator_quality(world, root, args.splits[0])
        for split in args.splits:
            chosen = {"raw": RAW, **{v: CP[v] for v in args.variants if v != "paper"}}
            if "paper" in args.variants:  # its alpha comes from the labeled set, before any training
                pick = annotators[name].setdefault("paper", {})[split] = paper_alpha(world, root, split)
                chosen["paper"] = Settings(alpha=pick["alpha"], mode="paper", rule="paper")
            variants[name, split] = chosen
        worlds[name], roots[name] = world, root
        print(f"annotator {name}: val mIoU {100 * annotators[name]['val_miou']:.1f}" + (
            f", paper alpha { {s: annotators[name]['paper'][s]['alpha'] for s in args.splits} }"
            if "paper" in args.variants else "") + f" ({time.perf_counter() - started:.0f}s)", flush=True)

    masks = {}
    for (name, split), chosen in variants.items():
        worlds[name, split] = replace(worlds[name], variants=chosen)
        for variant, settings in chosen.items():
            masks[name, split, variant] = calibrate_variant(worlds[name, split], roots[name], split, variant, settings)
    print(f"scores and calibrations ready after {time.perf_counter() - started:.0f}s", flush=True)

    first, second = [], []
    for split in args.splits:
        for seed in range(args.seeds):
            reference = args.annotators[0]  # labeled only ignores the masks: trained once, in its folder
            base, supervised = recipes(worlds[reference, split], args, seed)
            first.append((worlds[reference, split], roots[reference], split, seed, "labeled", "raw", 1, supervised,
                          f"{args.name}-labeled-only-seed{seed}", "self"))
            for name in args.annotators:
                world, root = worlds[name, split], roots[name]
                for variant in world.variants:
                    run = (world, root, split, seed, f"{name}:{variant}", variant)
                    first.append((*run[:4], f"{run[4]}-I", variant, 1, base, f"{args.name}-seed{seed}", "self"))
                    second.append((*run[:4], f"{run[4]}-II", variant, 2, base, f"{args.name}-seed{seed}", "self"))
    runs: dict = {}
    train_all([first] if args.stage1_only else [first, second], args.jobs, started, runs)
    took = (time.perf_counter() - started) / 60
    report = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "student": {k: str(v) for k, v in worlds[args.annotators[0]].student.items()},
              "annotators": annotators, "minutes": took,
              "masks": {f"{n}|{s}|{v}": m for (n, s, v), m in masks.items()},
              "runs": {f"{s}|{k}": {key: [r[key] for r in v] for key in v[0]} for (s, k), v in runs.items()}}
    write_text_atomic(args.out / f"{args.name}.json", json.dumps(report, indent=1) + "\n")
    text = render(report, args, variants) + (
        f"\n{args.seeds} seeds, epochs {args.epochs[0]}" + ("" if args.stage1_only else f" + {args.epochs[1]}") +
        f", crop {args.crop} from images scaled {args.scale_range[0]:g}-{args.scale_range[1]:g}x, student ESPNetv2 "
        f"s{args.student_width} from PASCAL weights, lr {args.lr:g}, head x{args.head_lr_mult:g}, class weights "
        f"{args.class_weights}, took {took:.1f} min\n")
    write_text_atomic(args.out / f"{args.name}.md", text)
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
    runs, cp = report["runs"], [v for v in CP if v in args.variants]
    stages = ("I",) if args.stage1_only else ("I", "II")
    lines = ["Annotators, zero-shot on CamVid val (raw argmax)" + (
        f", and the paper alpha picked from the labeled set (rule {PAPER_RULE} over "
        f"{', '.join(f'{a:g}' for a in PAPER_ALPHAS)}; held-out kept % / accuracy %)" if "paper" in cp else "") + ":",
        "", "| annotator | val mIoU % | val pixel acc. % |" + "".join(
            f" paper alpha ({s}) |" for s in args.splits if "paper" in cp), "|---|---|---|" + "---|" * (
            len(args.splits) if "paper" in cp else 0)]
    for name, a in report["annotators"].items():
        picks = []
        for split in args.splits if "paper" in cp else ():
            p = a["paper"][split]
            g = p["grid"][f"{p['alpha']:g}"]
            picks.append(f"{p['alpha']:g} ({100 * g['kept']:.0f} / {100 * g['accuracy']:.1f})")
        lines.append(f"| {name} | {100 * a['val_miou']:.1f} | {100 * a['val_pixel_accuracy']:.1f} |"
                     + "".join(f" {p} |" for p in picks))
    for which in ("best", "last"):
        title = "best val epoch" if which == "best" else "last epoch"
        columns = [("raw", "I")] + ([("raw", "II")] if "II" in stages else []) + [(v, st) for v in cp for st in stages]
        lines += ["", f"Student val mIoU % ({title}), mean over seeds (min-max):", "",
                  "| labeled | annotator | labeled only | " + " | ".join(f"+ {v}" + ("" if st == "I" and len(stages) == 1
                                                                           else f", stage {st}") for v, st in columns)
                  + " |", "|---|---|---|" + "---|" * len(columns)]
        for split in args.splits:
            labeled = runs[f"{split}|labeled"][which]
            for name in report["annotators"]:
                cells = [spread(labeled)] + [spread(runs[f"{split}|{name}:{v}-{st}"][which]) for v, st in columns]
                lines.append(f"| {split} | {name} | " + " | ".join(cells) + " |")
    pairs = [("raw-I", "labeled")] + [(f"{v}-I", b) for v in cp for b in ("raw-I", "labeled")] + (
        [(f"{v}-II", "raw-II") for v in cp] if "II" in stages else [])
    label = {"labeled": "labeled only", "raw-I": "raw", "raw-II": "raw II"}
    lines += ["", "Differences of means in points (best val epoch / last epoch); '>' or '<': the seed ranges do not "
              "overlap (beyond the seed spread):", "",
              "| labeled | annotator | " + " | ".join(f"{label.get(a, a.replace('-', ' '))} - {label[b]}"
                                                    for a, b in pairs) + " |", "|---|---|" + "---|" * len(pairs)]
    for split in args.splits:
        for name in report["annotators"]:
            def r(key, which):
                return runs[f"{split}|{key if key == 'labeled' else f'{name}:{key}'}"][which]
            lines.append(f"| {split} | {name} | " + " | ".join(
                f"{versus(r(a, 'best'), r(b, 'best'))} / {versus(r(a, 'last'), r(b, 'last'))}" for a, b in pairs) + " |")
    lines += gap_table(report, args, variants) + class_table(report, args, variants)
    lines += ["", "Per class, the share of the class's raw-argmax pixels (unlabeled images) each CP variant keeps, "
              "and the precision of what it keeps (kept % / precision %); raw IoU: the raw argmax's:"]
    for (name, split), chosen in variants.items():
        cps = [v for v in chosen if v != "raw"]
        first = report["masks"][f"{name}|{split}|raw"]["per_class"]
        lines += ["", f"{name}, labeled split {split}:", "",
                  "| class | raw IoU | " + " | ".join(row_name(chosen[v]) for v in cps) + " |",
                  "|---|---|" + "---|" * len(cps)]
        for c, raw in first.items():
            cells = [" / ".join(percent(x) for x in report["masks"][f"{name}|{split}|{v}"]["per_class"][c][:2])
                     for v in cps]
            lines.append(f"| {c} | {percent(raw[2])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def class_table(report: dict, args, variants: dict) -> list[str]:
    """Per class, where the masks help or hurt: the students' val IoU at their best epoch against the annotator's."""
    runs, lines = report["runs"], ["", "Per class, val IoU %: the annotator's raw argmax, and the students' at their best "
                                       "val epoch (mean over seeds):"]
    for (name, split), chosen in variants.items():
        iou = report["annotators"][name].get("val_iou")
        if iou is None:  # a report of an earlier version
            continue
        keys = ["labeled"] + [f"{name}:{v}-I" for v in chosen]
        means = [np.mean(runs[f"{split}|{k}"]["best_iou"], axis=0) for k in keys]
        lines += ["", f"{name}, labeled split {split}:", "",
                  "| class | annotator | labeled only | " + " | ".join(f"+ {v}" for v in chosen) + " |",
                  "|---|---|---|" + "---|" * len(chosen)]
        for c, (cls, own) in enumerate(iou.items()):
            lines.append(f"| {cls} | {percent(own)} | " + " | ".join(percent(m[c]) for m in means) + " |")
    return lines


def gap_table(report: dict, args, variants: dict) -> list[str]:
    """Where the student passes its annotator, and what the masks of the unlabeled images are worth from there."""
    runs = report["runs"]
    lines = ["", "The gap: the labeled-only student (best val epoch, mean over seeds) against each annotator's raw "
             "val mIoU, and the masks of the unlabeled train images against their ground truth (kept % @ pixel "
             "accuracy % on kept):", "",
             "| labeled | annotator | annotator val mIoU | labeled only | student - annotator | masks |", "|---|---|---|---|---|---|"]
    for split in args.splits:
        student = 100 * np.mean(runs[f"{split}|labeled"]["best"])
        for name, a in report["annotators"].items():
            masks = "; ".join(f"{v} {100 * m['kept']:.1f} @ {100 * m['acc_kept']:.1f}" for v in variants[name, split]
                              for m in [report["masks"][f"{name}|{split}|{v}"]])
            lines.append(f"| {split} | {name} | {100 * a['val_miou']:.1f} | {student:.1f} | "
                         f"{student - 100 * a['val_miou']:+.1f} | {masks} |")
    return lines


if __name__ == "__main__":
    main()
