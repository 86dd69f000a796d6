"""The strong-student regime table on a lent GPU, in one call (`benchmarks/gpu_student.sh`, issue 34).

    prepare   here: what the GPU machine needs and cannot fetch, into one folder: CamVid train and val images
              re-encoded as JPEG with their label PNGs, the labeled splits' lists, each annotator's raw and CP masks
              with their calibration records (computed here by bench-student's own stage 0 and stage 1), the
              annotators' quality figures, EdgeNets' model code and the PASCAL ESPNetv2 s2.0 weights, UniMatch's
              source when given (gpu_student.sh adds the wheels and checks the 60 MiB budget with the working tree).
    run       there: the regime table of bench-regime with the student a GPU affords (ESPNetv2 s2.0 from PASCAL
              weights, crops of 352 from images scaled 0.75-1.5x). First labeled-only runs validated every epoch up
              to --max-epochs: the epoch where their mean val mIoU stops rising (within --plateau points of its
              best) becomes every row's length, cut to what fits the rest of --budget (their measured seconds an
              epoch tell). Then labeled only / raw / CP crc / CP paper at that length, with one schedule, for the
              weakest and the strongest annotator at each split and seed, --jobs trainings side by side on the one
              GPU. Writes <results>/gpu-student.md and .json, the tables of bench-student (the runs stay in --out).

`run --smoke` takes the same path on the CPU with tiny settings (one split, one seed, 2 epochs, crop 64, 12 val
images): a check of the kit, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
import bench_student  # noqa: E402
from ablation import World, calibrate_variant, make_store, train_all  # noqa: E402
from pipeline import PROJECT_ROOT, config as cfg  # noqa: E402
from pipeline.atomic import write_text_atomic  # noqa: E402
from pipeline.stage1.calibrate import Settings  # noqa: E402
from numcodecs import Zstd  # noqa: E402
from pipeline.labels import write_palette_png  # noqa: E402
from pipeline.stage1.record import CALIBRATION, KEY_FILE, MASKS, SUMS_FILE, file_crc  # noqa: E402
from trainer.recipes import get_recipe  # noqa: E402

ANNOTATORS = ("dicenet0.5", "s2.0")  # the weakest (44.7 val mIoU) and the strongest Cityscapes network measured
SPLITS = ("1_16", "1_4", "1_2")
VARIANTS = ("raw", "crc", "paper")
STUDENT = "espnetv2_s_2.0_pascal_384x384.pth"
EDGENETS_CODE = ("model", "nn_layers", "utilities")  # the folders the ESPNetv2 factory imports from
UNIMATCH_CODE = ("unimatch.py", "supervised.py", "model", "util", "dataset", "configs")


def prepare(args) -> None:
    out = args.material
    if out.exists():
        shutil.rmtree(out)
    camvid = args.camvid
    for part in ("train", "val"):  # CamVid test is never carried: held out
        for image in sorted((camvid / part).glob("*.png")):
            _jpeg(image, out / "CamVid" / part / f"{image.stem}.jpg")
        shutil.copytree(camvid / f"{part}annot", out / "CamVid" / f"{part}annot")
    for split in SPLITS:
        for name in ("labeled.txt", "unlabeled.txt"):
            _relist(args.splits / split / name, out / "splits" / split / name)
    _relist(args.splits / "val.txt", out / "splits" / "val.txt")
    quality = {"annotators": {}, "masks": {}}
    for name in ANNOTATORS:
        world = bench_student.annotator_world(name, _student_args(SPLITS), {})
        root = (args.bench / world.name).resolve()
        make_store(world, root, SPLITS)  # stage 0 skips the images a store already holds
        figures = quality["annotators"][name] = bench_student.annotator_quality(world, root, SPLITS[0])
        for split in SPLITS:
            pick = figures.setdefault("paper", {})[split] = bench_student.paper_alpha(world, root, split)
            chosen = {"raw": bench_student.RAW, "crc": bench_student.CP["crc"],
                      "paper": Settings(alpha=pick["alpha"], mode="paper", rule="paper")}
            for variant, settings in chosen.items():
                quality["masks"][f"{name}|{split}|{variant}"] = calibrate_variant(world, root, split, variant,
                                                                                  settings)
                work = root / split / variant
                target = out / "masks" / name / split / variant
                target.mkdir(parents=True)
                shutil.copy2(work / CALIBRATION, target / CALIBRATION)
                pack_masks(work / MASKS, target)
        print(f"annotator {name}: val mIoU {100 * figures['val_miou']:.1f}; masks of {', '.join(SPLITS)} ready",
              flush=True)
    write_text_atomic(out / "quality.json", json.dumps(quality, indent=1) + "\n")
    for folder in EDGENETS_CODE:
        for source in (args.edgenets / folder).rglob("*.py"):
            target = out / "EdgeNets" / source.relative_to(args.edgenets)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    (out / "weights").mkdir()
    shutil.copy2(args.weights / STUDENT, out / "weights" / STUDENT)
    if args.unimatch:
        (out / "UniMatch").mkdir()
        for item in UNIMATCH_CODE:
            source = args.unimatch / item
            (shutil.copytree if source.is_dir() else shutil.copy2)(source, out / "UniMatch" / item)
    print(f"{out}: {_size(out) / 2 ** 20:.1f} MiB")


def pack_masks(masks: Path, target: Path) -> None:
    """A calibration's masks as one zstd stream of their labels (half the bytes of the PNGs) and their ids,
    shapes and key: `unpack_masks` writes the same masks back."""
    ids = sorted(p.stem for p in masks.glob("*.png"))
    labels = [np.asarray(Image.open(masks / f"{i}.png")) for i in ids]
    meta = {"key": (masks / KEY_FILE).read_text().strip(), "shapes": {i: list(a.shape) for i, a in zip(ids, labels)}}
    (target / "masks.json").write_text(json.dumps(meta) + "\n")
    (target / "masks.zst").write_bytes(Zstd(15).encode(np.concatenate([a.ravel() for a in labels])))


def unpack_masks(source: Path, masks: Path) -> None:
    """The masks folder `calibrate` wrote: palette PNGs, their key and CRC sums (of the PNGs written here)."""
    meta = json.loads((source / "masks.json").read_text())
    labels = np.frombuffer(Zstd().decode((source / "masks.zst").read_bytes()), np.uint8)
    masks.mkdir(parents=True, exist_ok=True)
    sums, at = {}, 0
    for image_id, (h, w) in meta["shapes"].items():
        write_palette_png(masks / f"{image_id}.png", labels[at:at + h * w].reshape(h, w))
        sums[image_id] = file_crc(masks / f"{image_id}.png")
        at += h * w
    (masks / SUMS_FILE).write_text(json.dumps(sums) + "\n")
    (masks / KEY_FILE).write_text(meta["key"] + "\n")


def _jpeg(png: Path, jpg: Path) -> None:
    jpg.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(png) as img:
        img.convert("RGB").save(jpg, quality=85)


def _relist(source: Path, target: Path) -> None:
    """A split list with its images renamed .png -> .jpg (the masks keep their names)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for line in source.read_text().splitlines():
        image, *mask = line.split()
        lines.append(" ".join([str(Path(image).with_suffix(".jpg")), *mask]))
    target.write_text("\n".join(lines) + "\n")


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _student_args(splits, **changes) -> argparse.Namespace:
    """bench-student's arguments for its world and recipe: the GPU student."""
    fields = dict(splits=list(splits), epochs=[20, 1], crop=352, eval_from=0.0, student_width="2.0", lr=3e-3,
                  head_lr_mult=1.0, scale_range=[0.75, 1.5], class_weights="median-frequency", jobs=4,
                  annotators=list(ANNOTATORS), variants=["crc", "paper"], stage1_only=True, seeds=3, name="gpu-student")
    return argparse.Namespace(**{**fields, **changes})


# ---------------------------------------------------------------------------------------------------- run

def material_config(material: Path, split: str, val: Path | None = None) -> cfg.Config:
    """The camvid preset of the split over the carried images and lists."""
    lists = material / "splits"
    return replace(cfg.load(f"camvid-{split}"), root=material / "CamVid", labeled=lists / split / "labeled.txt",
                   unlabeled=lists / split / "unlabeled.txt", val=val or lists / "val.txt")


def run(args) -> None:
    started = time.perf_counter()
    material, out = args.material.resolve(), args.out.resolve()
    quality = json.loads((material / "quality.json").read_text())
    splits, seeds = (["1_2"], 1) if args.smoke else (list(SPLITS), args.seeds)
    val = None
    if args.smoke:  # 12 val images
        val = out / "val-smoke.txt"
        val.parent.mkdir(parents=True, exist_ok=True)
        val.write_text("".join((material / "splits" / "val.txt").read_text().splitlines(True)[:12]))
    settings = _student_args(splits, seeds=seeds, jobs=args.jobs)
    student = {**bench_student.student_fields(settings), "model_code": material / "EdgeNets",
               "init_weights": material / "weights" / STUDENT}
    worlds = {}
    for name in ANNOTATORS:
        worlds[name] = World(name=f"gpu-student/{name}", title=f"CamVid, Cityscapes {name} annotator",
                             config=partial(material_config, material, val=val), splits=tuple(splits),
                             recipe="camvid-tiny", variants={}, plugin="crc", epochs=(1, 1), crop=settings.crop,
                             eval_from=0.0, student=student)
        for split in splits:
            for variant in VARIANTS:  # the calibration records and masks computed where the annotators ran
                work = out / worlds[name].name / split / variant
                if not (work / MASKS / KEY_FILE).is_file():
                    source = material / "masks" / name / split / variant
                    work.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(source / CALIBRATION, work / CALIBRATION)
                    unpack_masks(source, work / MASKS)
    crop = 64 if args.smoke else settings.crop
    cap = 2 if args.smoke else args.max_epochs
    workers = max(0, (os.cpu_count() or 1) // args.jobs - 1)

    def recipe(seed: int, epochs: int, labeled_only: bool, eval_from: float = 0.0):
        _, base = get_recipe("camvid-tiny", "folder", **student, seed=seed, epochs=(epochs, 1), crop=crop,
                             batch_size=args.batch_size, workers=workers, eval_from=eval_from)
        return replace(base, lambda_start=0.0, lambda_end=0.0, lambda_schedule="constant") if labeled_only else base

    reference = worlds[ANNOTATORS[0]]
    root = out / reference.name
    name = "gpu-student-smoke" if args.smoke else "gpu-student"
    results = (args.results or out).resolve()
    results.mkdir(parents=True, exist_ok=True)
    # 1. how long: labeled-only runs validated every epoch up to the cap, read for where their curve stops rising
    capped = [(reference, root, split, seed, "labeled-cap", "raw", 1, recipe(seed, cap, True),
               f"labeled-only-cap{cap}-seed{seed}", "self") for split in splits for seed in range(seeds)]
    runs: dict = {}
    train_all([capped], args.jobs, started, runs)
    curves = {split: np.mean([_curve(root / split / "raw", f"labeled-only-cap{cap}-seed{s}") for s in range(seeds)],
                             axis=0) for split in splits}
    rising = plateau(curves, args.plateau / 100)
    # 2. every row at that length, within what is left of the budget (costs measured in step 1, under the same load)
    rows = len(ANNOTATORS) * len(VARIANTS) + 1
    spent = time.perf_counter() - started
    epochs = fit_epochs(rising, _costs(root, splits, seeds, cap), rows * seeds, args.jobs, args.budget - spent)
    said = (f"labeled-only val mIoU stops rising at epoch {rising} of {cap} (mean curves "
            + "; ".join(f"{s}: {' '.join(f'{100 * v:.1f}' for v in c)}" for s, c in curves.items()) + ")"
            + ("" if epochs == rising else f"; {epochs} epochs fit the budget's remaining {args.budget - spent:.0f} s"))
    print(said, flush=True)
    settings_out = {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "crop": crop,
                    "epochs": epochs, "rising": rising,
                    "labeled_only_curves": {s: c.tolist() for s, c in curves.items()}}
    write_text_atomic(results / f"{name}.json", json.dumps({"args": settings_out, "phase": "labeled-only curves"},
                                                           indent=1) + "\n")
    runs = {k: v for k, v in runs.items() if k[1] != "labeled-cap"}  # labeled only is retrained at that length
    rows_jobs = [(reference, root, split, seed, "labeled", "raw", 1, recipe(seed, epochs, True, 0.5),
                  f"labeled-only-e{epochs}-seed{seed}", "self") for split in splits for seed in range(seeds)]
    rows_jobs += [(worlds[n], out / worlds[n].name, split, seed, f"{n}:{variant}-I", variant, 1,
                   recipe(seed, epochs, False, 0.5), f"gpu-e{epochs}-seed{seed}", "self")
                  for split in splits for seed in range(seeds) for n in ANNOTATORS for variant in VARIANTS]
    train_all([rows_jobs], args.jobs, started, runs)
    took = (time.perf_counter() - started) / 60
    variants = {(n, s): {"raw": bench_student.RAW, "crc": bench_student.CP["crc"],
                         "paper": Settings(alpha=quality["annotators"][n]["paper"][s]["alpha"], rule="paper")}
                for n in ANNOTATORS for s in splits}
    report = {"args": settings_out, "student": {k: str(v) for k, v in student.items()},
              "annotators": quality["annotators"], "minutes": took,
              "masks": {k: m for k, m in quality["masks"].items() if k.split("|")[1] in splits},
              "runs": {f"{s}|{k}": {key: [r[key] for r in v] for key in v[0]} for (s, k), v in runs.items()}}
    write_text_atomic(results / f"{name}.json", json.dumps(report, indent=1) + "\n")
    text = bench_student.render(report, settings, variants) + (
        f"\n{seeds} seeds, {epochs} epochs ({said}), crop {crop} from images scaled "
        f"{settings.scale_range[0]:g}-{settings.scale_range[1]:g}x, batch {args.batch_size}, student ESPNetv2 s2.0 "
        f"from PASCAL weights, {args.jobs} trainings side by side, took {took:.1f} min\n")
    write_text_atomic(results / f"{name}.md", text)
    print(text)


def fit_epochs(rising: int, costs: dict, runs_per_split: int, jobs: int, seconds: float) -> int:
    """The most epochs up to ``rising`` whose runs fit in ``seconds`` (at least 1): each split's runs cost
    epochs x its training seconds an epoch + validations (from half-way, as the rows validate) x its seconds
    a validation, ``jobs`` at a time."""
    def cost(e: int) -> float:
        return sum(runs_per_split * (e * train + (e - e // 2) * val) for train, val in costs.values()) / jobs
    return max([1] + [e for e in range(1, rising + 1) if cost(e) <= seconds])


def _costs(root: Path, splits, seeds: int, cap: int) -> dict:
    """Per split: (training seconds an epoch, seconds a validation), the means over its capped labeled-only runs."""
    costs = {}
    for split in splits:
        lines = [json.loads(x) for s in range(seeds) for x in
                 (root / split / "raw" / "runs" / f"labeled-only-cap{cap}-seed{s}" / "stage1" / "metrics.jsonl")
                 .read_text().splitlines()]
        costs[split] = (np.mean([x["seconds"] for x in lines]), np.mean([x.get("val_seconds", 0.0) for x in lines]))
    return costs


def plateau(curves: dict, within: float) -> int:
    """The first epoch at which every split's mean val mIoU curve is within ``within`` of its best."""
    return max(int(np.argmax(c >= c.max() - within)) + 1 for c in curves.values())


def _curve(work: Path, run: str) -> np.ndarray:
    lines = [json.loads(x) for x in (work / "runs" / run / "stage1" / "metrics.jsonl").read_text().splitlines()]
    return np.array([x["miou"] for x in lines])


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare", help="gather the material here")
    p.add_argument("material", type=Path)
    p.add_argument("--camvid", type=Path, default=PROJECT_ROOT / "data" / "CamVid")
    p.add_argument("--splits", type=Path, default=PROJECT_ROOT / "data" / "splits" / "camvid")
    p.add_argument("--edgenets", type=Path, default=PROJECT_ROOT / "third_party" / "EdgeNets")
    p.add_argument("--weights", type=Path, default=PROJECT_ROOT / "data" / "weights")
    p.add_argument("--unimatch", type=Path, default=None, help="a UniMatch checkout (its unimatch.py travels)")
    p.add_argument("--bench", type=Path, default=PROJECT_ROOT / "work" / "bench",
                   help="where bench-student keeps its score stores (reused)")
    r = commands.add_parser("run", help="train the table (on the GPU)")
    r.add_argument("material", type=Path)
    r.add_argument("--out", type=Path, default=PROJECT_ROOT / "work" / "gpu-student", help="the runs' folder")
    r.add_argument("--results", type=Path, default=None, help="where the tables go (default: --out)")
    r.add_argument("--budget", type=float, default=360, help="seconds for all of it: the rows' epochs are cut to fit")
    r.add_argument("--smoke", action="store_true", help="the whole path on the CPU with tiny settings")
    r.add_argument("--seeds", type=int, default=3)
    r.add_argument("--max-epochs", type=int, default=16, help="the labeled-only runs' cap")
    r.add_argument("--plateau", type=float, default=0.5, help="points below the best that count as stopped rising")
    r.add_argument("--batch-size", type=int, default=8)
    r.add_argument("--jobs", type=int, default=6, help="trainings side by side on the one GPU")
    return parser.parse_args()


if __name__ == "__main__":
    arguments = parse()
    prepare(arguments) if arguments.command == "prepare" else run(arguments)
