"""`make bench-logits`: the stage-0 data path on VOC-sized images, against the naive alternative.

A trivially cheap TorchScript model (4x average pool + 1x1 conv to K=21 logits) keeps the model out
of the measurement: what is timed is decoding, preprocessing, batching, encoding (the store's default, uint8
since issue 32), compression and writing. The naive alternative writes one fp32 .npy per image at full resolution.

Then the CPU allocator's share (`pipeline.stage0.logits.heap_reused`), in the same run: a convolutional network with
an annotator's activations (ESPNetv2-like widths, 1/8 stride, 12 classes) on CamVid-sized images (480x360),
scored with freed memory handed back to the system after every block (glibc's default) and kept for the next
batch (what stage 0 does on a CPU): images/s, user and system CPU time, minor page faults.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import pipeline.stage0.logits as logits  # noqa: E402
from pipeline.config import Config  # noqa: E402
from pipeline.data.datasets import read_image  # noqa: E402
from pipeline.stage0.logits import run_logits  # noqa: E402

K, H, W = 21, 375, 500


class Cheap(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.head = torch.nn.Conv2d(3, K, 1)

    def forward(self, x):
        return self.head(F.avg_pool2d(x, 4))


def make_images(root: Path, n: int) -> None:
    """Natural-ish JPEGs (smooth colour fields + edges), so they compress and decode like photos."""
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((W, H), Image.BICUBIC)
        arr = np.asarray(img).astype(np.int16) + rng.integers(-12, 13, (H, W, 3))
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(root / "images" / f"{i:05d}.jpg", quality=90)
    (root / "classes.txt").write_text("\n".join(f"class{i}" for i in range(K)) + "\n")
    (root / "list.txt").write_text("".join(f"images/{i:05d}.jpg\n" for i in range(n)))


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def naive(root: Path, model, out: Path, n: int) -> float:
    out.mkdir()
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(n):
            image = read_image(root / "images" / f"{i:05d}.jpg")
            x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
            logits = F.interpolate(model(x), size=(H, W), mode="bilinear", align_corners=False)[0]
            np.save(out / f"{i:05d}.npy", logits.numpy().astype(np.float32))
    return time.perf_counter() - start


def annotator_like(classes: int) -> torch.nn.Module:
    """Grouped 3x3 convolutions down to 1/8, then a classifier and an upsampling back to the input."""
    layers = [torch.nn.Conv2d(3, 32, 3, 2, 1), torch.nn.ReLU()]
    for c_in, c_out, stride in ((32, 64, 2), (64, 64, 1), (64, 128, 2), (128, 128, 1), (128, 128, 1)):
        layers += [torch.nn.Conv2d(c_in, c_out, 3, stride, 1, groups=4), torch.nn.BatchNorm2d(c_out),
                   torch.nn.PReLU(c_out)]
    layers += [torch.nn.Conv2d(128, classes, 1), torch.nn.Upsample(scale_factor=8, mode="bilinear")]
    return torch.nn.Sequential(*layers).eval()


def heap_comparison(tmp: Path, n: int, batch_size: int) -> None:
    root = tmp / "camvid-like"
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(n):
        coarse = rng.integers(0, 256, (45, 60, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((480, 360), Image.BICUBIC).save(root / "images" / f"{i:05d}.jpg", quality=90)
    (root / "classes.txt").write_text("\n".join(f"class{i}" for i in range(12)) + "\n")
    (root / "list.txt").write_text("".join(f"images/{i:05d}.jpg\n" for i in range(n)))
    torch.manual_seed(0)
    torch.jit.script(annotator_like(12)).save(str(tmp / "annotator.pt"))
    print(f"\nthe CPU allocator, {n} images 480x360, batch {batch_size}, an annotator-like network (loader in-process)")
    print(f"{'freed memory':34s}{'images/s':>10s}{'user s':>9s}{'sys s':>8s}{'minor faults':>14s}")
    for label, reuse in (("returned to the system (before)", False), ("kept for the next batch (now)", True)):
        config = Config(format="folder", root=root, labeled=root / "list.txt", unlabeled=root / "list.txt", val=None,
                        classes=None, backend="torchscript", weights=tmp / "annotator.pt",
                        work_dir=tmp / f"work-{reuse}", source="bench")
        real = logits.heap_reused
        logits.heap_reused = real if reuse else (lambda enabled: contextlib.nullcontext())
        try:
            usage = resource.getrusage(resource.RUSAGE_SELF)
            start = time.perf_counter()
            run_logits(config, "unlabeled", batch_size=batch_size, device="cpu", workers=0, info=lambda m: None)
            took = time.perf_counter() - start
            after = resource.getrusage(resource.RUSAGE_SELF)
        finally:
            logits.heap_reused = real
        print(f"{label:34s}{n / took:10.1f}{after.ru_utime - usage.ru_utime:9.1f}{after.ru_stime - usage.ru_stime:8.1f}"
              f"{(after.ru_minflt - usage.ru_minflt) / 1e6:12.2f} M")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--naive-images", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--heap-images", type=int, default=160, help="images of the allocator comparison")
    args = parser.parse_args()
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="bench-logits-"))
    try:
        root = tmp / "data"
        make_images(root, args.images)
        model = torch.jit.script(Cheap().eval())
        model.save(str(tmp / "cheap.pt"))
        config = Config(format="folder", root=root, labeled=root / "list.txt", unlabeled=root / "list.txt",
                        val=None, classes=None, backend="torchscript", weights=tmp / "cheap.pt",
                        work_dir=tmp / "work", source="bench")
        start = time.perf_counter()
        result = run_logits(config, "unlabeled", batch_size=args.batch_size, device="cpu")
        ours = time.perf_counter() - start
        assert result["written"] == args.images
        ours_bytes = folder_bytes(tmp / "work/logits.zarr/scores") / args.images
        naive_s = naive(root, model, tmp / "naive", args.naive_images)
        naive_bytes = folder_bytes(tmp / "naive") / args.naive_images
        cores = torch.get_num_threads()
        print(f"stage-0 data path, {args.images} images {W}x{H}, K={K}, batch {args.batch_size}, "
              f"{cores} torch threads, cheap TorchScript model")
        print(f"{'':28s}{'images/s':>10s}{'KB/image':>12s}")
        print(f"{'conformalsam logits.zarr':28s}{args.images / ours:10.1f}{ours_bytes / 1024:12.1f}")
        print(f"{'naive fp32 .npy, full res':28s}{args.naive_images / naive_s:10.1f}{naive_bytes / 1024:12.1f}")
        print(f"bytes ratio naive/ours: {naive_bytes / ours_bytes:.1f}x   speed ratio ours/naive: "
              f"{(args.images / ours) / (args.naive_images / naive_s):.1f}x")
        heap_comparison(tmp, args.heap_images, args.batch_size)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
