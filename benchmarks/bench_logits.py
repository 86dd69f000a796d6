"""`make bench-logits`: the stage-0 data path on VOC-sized images, against the naive alternative.

A trivially cheap TorchScript model (4x average pool + 1x1 conv to K=21 logits) keeps the model out
of the measurement: what is timed is decoding, preprocessing, batching, fp16 conversion, compression
and writing. The naive alternative writes one fp32 .npy per image at full resolution.
"""

from __future__ import annotations

import argparse
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
from pipeline.config import Config  # noqa: E402
from pipeline.datasets import read_image  # noqa: E402
from pipeline.logits import run_logits  # noqa: E402

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--naive-images", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
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
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
