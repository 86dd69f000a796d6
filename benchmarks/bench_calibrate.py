"""`make bench-calibrate`: stage 1 at PASCAL VOC scale, against the naive in-memory approach.

Synthetic stored scores stand in for SEEM's: 1,464 labeled images of 500x375 (VOC's largest classic
split) with K=21 logits stored at 1/4 resolution, VOC-like masks (background, a few objects, a 255 band
on object boundaries), plus unlabeled images for the mask writer. Each measurement runs in a fresh
process, so its peak RSS is its own:

- conformalsam: `run_calibrate(..., write_masks=False)` on 1/4, 1/2 and all labeled images (streams
  into fixed-size histograms), less its held-out diagnostics pass, which is timed and printed apart;
- naive: every labeled pixel's score at full resolution concatenated in memory, then `torch.kthvalue`
  (per class for mondrian); the thresholds must be identical;
- masks: `run_calibrate` writing the unlabeled images' PNGs; the mask phase is timed on its own.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from joblib import Parallel, delayed
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.isolated import measure  # noqa: E402
from pipeline.stage1.calibrate import Settings, run_calibrate  # noqa: E402
from pipeline.config import Config  # noqa: E402
from pipeline.stage1.conformal import Upsampler, conformal_rank, grid_values, nonconformity, to_bins  # noqa: E402
from pipeline.data.datasets import Dataset  # noqa: E402
from pipeline.stage0.store import LogitsStore, open_for_writing, write_scores  # noqa: E402

K, H, W, STRIDE = 21, 375, 500, 4


def synthetic_image(i: int) -> tuple[np.ndarray, np.ndarray]:
    """(mask uint8 H x W, logits float K x h x w): objects on background, scores right most of the time."""
    rng = np.random.default_rng(i)
    truth = np.zeros((H, W), np.uint8)
    yy, xx = np.mgrid[0:H, 0:W]
    for _ in range(rng.integers(1, 4)):
        cy, cx = rng.uniform(0, H), rng.uniform(0, W)
        ry, rx = rng.uniform(30, 150), rng.uniform(30, 200)
        truth[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = rng.integers(1, K)
    edge = np.zeros_like(truth, bool)  # VOC marks object boundaries 255
    edge[1:] |= truth[1:] != truth[:-1]
    edge[:, 1:] |= truth[:, 1:] != truth[:, :-1]
    edge = edge | np.roll(edge, 1, 0) | np.roll(edge, -1, 0) | np.roll(edge, 1, 1) | np.roll(edge, -1, 1)
    mask = np.where(edge, 255, truth).astype(np.uint8)
    h, w = -(-H // STRIDE), -(-W // STRIDE)
    small = truth[::STRIDE, ::STRIDE][:h, :w]
    if rng.random() < 0.3:  # a confused object: the model sees another class
        small = np.where(small > 0, (small + rng.integers(1, K - 1)) % (K - 1) + 1, 0)
    logits = rng.normal(0, 1.0, (K, h, w)).astype(np.float32)
    logits[small, np.arange(h)[:, None], np.arange(w)[None, :]] += rng.uniform(2.5, 6)
    return mask, logits


def build(root: Path, labeled: int, unlabeled: int) -> None:
    store = root / "work" / "logits.zarr"
    open_for_writing(store, {"classes": [f"class{k}" for k in range(K)], "backend": "bench", "model_id": "synthetic",
                             "weights_sha256": "", "score_kind": "logits", "scale": 1 / STRIDE}, force=True)
    (root / "masks").mkdir(parents=True)

    def one(i: int) -> None:
        mask, logits = synthetic_image(i)
        Image.fromarray(mask).save(root / "masks" / f"{i:05d}.png")
        write_scores(store, f"{i:05d}", logits, (H, W))

    Parallel(n_jobs=os.cpu_count(), prefer="threads")(delayed(one)(i) for i in range(labeled + unlabeled))
    (root / "classes.txt").write_text("".join(f"class{k}\n" for k in range(K)))
    for n in sorted({labeled // 4, labeled // 2, labeled}):
        (root / f"labeled_{n}.txt").write_text("".join(f"images/{i:05d}.jpg masks/{i:05d}.png\n" for i in range(n)))
    (root / "unlabeled.txt").write_text("".join(f"images/{i:05d}.jpg masks/{i:05d}.png\n"
                                                for i in range(labeled, labeled + unlabeled)))


def config(root: Path, n: int, work: str) -> Config:
    work_dir = root / work
    work_dir.mkdir(exist_ok=True)
    if not (work_dir / "logits.zarr").exists():
        (work_dir / "logits.zarr").symlink_to(root / "work" / "logits.zarr")
    return Config(format="folder", root=root, labeled=root / f"labeled_{n}.txt", unlabeled=root / "unlabeled.txt",
                  val=None, classes=None, backend="bench", weights=None, work_dir=work_dir, source="bench")


def phase_timer(times: dict):
    @contextmanager
    def progress(description: str):
        start = time.perf_counter()
        yield lambda advance, total=None: None
        times[description] = time.perf_counter() - start
    return progress


# ------------------------------------------------------------------ measurements (one per process)

def to_stderr(message: str) -> None:
    """Calibrate's warnings: stdout carries the measurement's JSON."""
    print(message, file=sys.stderr)


def job_fit(root: Path, n: int, mode: str, alpha: float) -> dict:
    times: dict = {}
    start = time.perf_counter()
    record = run_calibrate(config(root, n, f"fit_{n}_{mode}"), Settings(alpha=alpha, mode=mode), write_masks=False,
                           progress=phase_timer(times), warn=to_stderr)
    held_out = times["held-out"]  # the diagnostics' pass (every labeled image at full resolution), timed apart
    seconds = time.perf_counter() - start - held_out
    q = record["qhat"]
    return {"seconds": seconds, "pass_seconds": times["labeled"], "held_out_seconds": held_out,
            "pixels": sum(record["n_pixels"].values()), "qhat": list(q.values()) if isinstance(q, dict) else q}


def job_naive(root: Path, n: int, alpha: float) -> dict:
    cfg = config(root, n, "naive")
    dataset, store = Dataset(cfg), LogitsStore(cfg.work_dir / "logits.zarr")
    start = time.perf_counter()
    scores, labels = [], []
    for sample in dataset.split("labeled"):
        probs = store.probabilities(sample.id)
        full = Upsampler(probs.shape[1:], store.image_size(sample.id)).full(probs)
        mask = torch.from_numpy(dataset.read_mask(sample.mask)).long()
        valid = mask != 255
        score = nonconformity(full.gather(0, mask.masked_fill(~valid, 0)[None])[0][valid])
        scores.append(grid_values()[to_bins(score)])  # the same rounded-up scores ...
        labels.append(mask[valid].to(torch.uint8))
    scores, labels = torch.cat(scores), torch.cat(labels)
    total = scores.numel()
    pooled = torch.kthvalue(scores, conformal_rank(total, alpha)).values.item()  # ... and kthvalue
    per_class = []
    for y in range(K):
        own = scores[labels == y]
        k = conformal_rank(own.numel(), alpha)
        per_class.append(torch.kthvalue(own, k).values.item() if k <= own.numel() else pooled)
    return {"seconds": time.perf_counter() - start, "pixels": total, "qhat": pooled, "qhat_mondrian": per_class}


def job_masks(root: Path, n: int, alpha: float) -> dict:
    times: dict = {}
    record = run_calibrate(config(root, n, "masks"), Settings(alpha=alpha), progress=phase_timer(times),
                           warn=to_stderr)
    return {"images": record["masks"]["count"], "seconds": times["masks"],
            "kept": record["diagnostics"]["unlabeled"]["kept_fraction"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labeled", type=int, default=1464)
    parser.add_argument("--unlabeled", type=int, default=400)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--job", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        kind, root, n = args.job[0], Path(args.job[1]), int(args.job[2])
        result = {"fit": lambda: job_fit(root, n, args.job[3], args.alpha), "naive": lambda: job_naive(root, n, args.alpha),
                  "masks": lambda: job_masks(root, n, args.alpha)}[kind]()
        print(json.dumps(result))
        return

    tmp = Path(tempfile.mkdtemp(prefix="bench-calibrate-"))
    try:
        start = time.perf_counter()
        build(tmp, args.labeled, args.unlabeled)
        print(f"synthetic VOC-scale store: {args.labeled} labeled + {args.unlabeled} unlabeled images {W}x{H}, K={K}, "
              f"logits at 1/{STRIDE} resolution, built in {time.perf_counter() - start:.0f}s; "
              f"{os.cpu_count()} cores, alpha {args.alpha}")
        sizes = sorted({args.labeled // 4, args.labeled // 2, args.labeled})
        print(f"{'':14s}{'labeled imgs':>13s}{'pixels':>13s}{'seconds':>9s}{'Mpixel/s':>10s}{'peak RSS MB':>13s}")
        for n in sizes:
            ours, ours_rss = measure(__file__, ["fit", str(tmp), str(n), "paper"])
            naive, naive_rss = measure(__file__, ["naive", str(tmp), str(n)])
            assert ours["qhat"] == naive["qhat"], (ours["qhat"], naive["qhat"])
            assert ours["pixels"] == naive["pixels"]
            for name, r, rss in (("conformalsam", ours, ours_rss), ("naive", naive, naive_rss)):
                print(f"{name:14s}{n:13d}{r['pixels']:13,d}{r['seconds']:9.1f}{r['pixels'] / r['seconds'] / 1e6:10.1f}"
                      f"{rss:13.0f}")
        mondrian, _ = measure(__file__, ["fit", str(tmp), str(sizes[-1]), "mondrian"])
        assert mondrian["qhat"] == naive["qhat_mondrian"], (mondrian["qhat"], naive["qhat_mondrian"])
        print(f"thresholds identical to the naive kthvalue at every n (paper: qhat {ours['qhat']:.4f}; "
              f"mondrian: all {K} per-class thresholds at n = {sizes[-1]})")
        print(f"conformalsam labeled pass alone at n = {sizes[-1]}: "
              f"{ours['pixels'] / ours['pass_seconds'] / 1e6:.1f} Mpixel/s; the held-out pseudo-labels of the "
              f"diagnostics, not in the figures above: {ours['held_out_seconds']:.1f}s "
              f"({sizes[-1] / ours['held_out_seconds']:.1f} images/s)")
        masks, masks_rss = measure(__file__, ["masks", str(tmp), str(sizes[-1])])
        print(f"masks: {masks['images']} unlabeled PNGs at full resolution in {masks['seconds']:.1f}s = "
              f"{masks['images'] / masks['seconds']:.1f} images/s (kept {100 * masks['kept']:.1f}% of pixels, "
              f"peak RSS {masks_rss:.0f} MB)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
