"""Our `--method unimatch` training step against UniMatch's own `unimatch.py`, on one device (issue 34).

Both train DeepLabV3+ R101 from random initialisation on the same generated images (21 classes), crop 321,
8 labeled + 8 unlabeled images a step, and are timed over --steps steps after --warmup, data loading included:
images/s (16 per step) and peak GPU memory.

    ours    `train_stage` stage II `--method unimatch` (after a one-epoch labeled-only stage I), fp32 and bf16
    theirs  UniMatch's unimatch.py from the user's checkout, run as it is (fp32: it has no mixed precision), with
            two things changed from outside: its backbone is built without pretrained weights (there are none
            here) and SGD.step is timed (it stops the run after the last timed step). UniMatch's step also labels
            a second unlabeled batch in an eval-mode pass, which ours does not (trainer/methods/unimatch.py).

--cpu-dry-run (for `gpu_student.sh run --smoke`) runs both on the CPU with tiny settings; UniMatch's CUDA calls,
NCCL, SyncBatchNorm and torchvision's transforms are stood in for there, so its figures check the plumbing only.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import shutil
import socket
import sys
import time
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipeline import PROJECT_ROOT, config as cfg  # noqa: E402
from trainer.recipes import get_recipe  # noqa: E402
from trainer.stages import train_stage  # noqa: E402

CLASSES = 21


class Done(Exception):
    """Raised by the timed SGD.step after the last timed step: UniMatch's loop has no step limit."""


def make_data(root: Path, labeled: int, unlabeled: int, size=(375, 500), seed: int = 0) -> None:
    """Images with masks of blocky regions (VOC's image size), lists for both code bases: every line 'image mask'
    (UniMatch's unlabeled lists carry masks too: its padding uses them)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(labeled + unlabeled):
        small = rng.integers(0, CLASSES, (6, 8), dtype=np.uint8)
        mask = np.asarray(Image.fromarray(small).resize(size[::-1], Image.NEAREST))
        colours = rng.integers(0, 255, (CLASSES, 3), dtype=np.uint8)
        noise = rng.integers(0, 40, (*size, 3), dtype=np.uint8)
        Image.fromarray(colours[mask] // 2 + noise).save(root / "images" / f"{i:04d}.jpg", quality=90)
        Image.fromarray(mask).save(root / "masks" / f"{i:04d}.png")
        lines.append(f"images/{i:04d}.jpg masks/{i:04d}.png")
    (root / "labeled.txt").write_text("\n".join(lines[:labeled]) + "\n")
    (root / "unlabeled.txt").write_text("\n".join(lines[labeled:]) + "\n")
    (root / "val.txt").write_text("\n".join(lines[:2]) + "\n")
    (root / "classes.txt").write_text("\n".join(f"class{c}" for c in range(CLASSES)) + "\n")


def ours(root: Path, work: Path, amp: str, args) -> dict:
    """Our stage II `--method unimatch` step: images/s over the timed steps, peak memory."""
    config = replace(cfg.load("toy"), format="folder", root=root, labeled=root / "labeled.txt",
                     unlabeled=root / "unlabeled.txt", val=root / "val.txt", work_dir=work, classes=None)
    _, recipe = get_recipe("voc-r101-321", "folder", crop=args.crop, batch_size=args.batch, amp=amp,
                           workers=args.workers, epochs=(1, 1))  # no backbone weights: random init
    name = f"step-{amp}"
    first = replace(recipe, epochs=(1, 1), lambda_start=0.0, lambda_end=0.0, lambda_schedule="constant")
    train_stage(config, "voc-r101-321", first, 1, name=name, log=_quiet)  # stage II starts from a stage I
    stamps: list[float] = []

    def progress(description, unit="img"):
        from contextlib import contextmanager

        @contextmanager
        def bar():
            def update(advance, total=None):
                if advance and description.startswith("stage 2"):
                    stamps.append(time.perf_counter())
            yield update
        return bar()

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    train_stage(config, "voc-r101-321", recipe, 2, name=name, log=_quiet, method="unimatch", progress=progress,
                init=work / "runs" / name / "stage1" / "last.pt")
    return _figures(stamps, args)


def theirs(checkout: Path, root: Path, work: Path, args) -> dict:
    """UniMatch's unimatch.py on the same images, its step timed through SGD.step."""
    work.mkdir(parents=True, exist_ok=True)
    for item in ("unimatch.py", "supervised.py", "model", "util", "dataset"):
        link = work / item
        if not link.exists():
            link.symlink_to(checkout.resolve() / item)
    (work / "splits" / "pascal").mkdir(parents=True, exist_ok=True)
    (work / "splits" / "pascal" / "val.txt").write_text((root / "val.txt").read_text())
    config = {"dataset": "pascal", "nclass": CLASSES, "crop_size": args.crop, "data_root": str(root), "epochs": 1,
              "batch_size": args.batch, "lr": 0.001, "lr_multi": 10.0,
              "criterion": {"name": "CELoss", "kwargs": {"ignore_index": 255}}, "conf_thresh": 0.95,
              "model": "deeplabv3plus", "backbone": "resnet101", "replace_stride_with_dilation": [False, False, True],
              "dilations": [6, 12, 18]}
    (work / "config.yaml").write_text(json.dumps(config))  # JSON is YAML
    if args.cpu_dry_run:
        _stand_ins()
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    here, path = Path.cwd(), list(sys.path)
    os.chdir(work)  # its val list and checkpoints are relative to the working folder
    sys.path.insert(0, str(work))
    import model.backbone.resnet as resnet  # UniMatch's

    for arch in ("resnet50", "resnet101"):  # no pretrained weights here: random initialisation, as ours
        resnet.__dict__[arch] = _unpretrained(resnet.__dict__[arch])
    stamps: list[float] = []
    step = torch.optim.SGD.step

    def timed(self, *a, **k):
        result = step(self, *a, **k)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        if len(stamps) > args.warmup + args.steps:
            raise Done
        return result

    torch.optim.SGD.step = timed
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    sys.argv = ["unimatch.py", "--config", "config.yaml", "--labeled-id-path", str(root / "labeled.txt"),
                "--unlabeled-id-path", str(root / "unlabeled.txt"), "--save-path", str(work / "save")]
    try:
        runpy.run_path("unimatch.py", run_name="__main__")
    except Done:
        pass
    finally:
        torch.optim.SGD.step = step
        os.chdir(here)
        sys.path[:] = path
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return _figures(stamps, args)


def _unpretrained(build):
    def unpretrained(pretrained=False, **kwargs):
        return build(False, **kwargs)
    return unpretrained


def _figures(stamps: list[float], args) -> dict:
    timed = stamps[args.warmup:args.warmup + args.steps + 1]
    if len(timed) < 2:
        raise RuntimeError(f"only {len(stamps)} steps ran, {args.warmup + args.steps + 1} needed")
    seconds = timed[-1] - timed[0]
    return {"images_per_s": 2 * args.batch * (len(timed) - 1) / seconds, "steps_timed": len(timed) - 1,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else None}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stand_ins() -> None:
    """For the CPU dry run only: UniMatch's code calls .cuda(), NCCL and SyncBatchNorm, and torchvision's
    transforms (torchvision does not import beside the CPU torch here)."""
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    torch.cuda.set_device = lambda *a, **k: None
    torch.cuda.device_count = lambda: 1
    init = torch.distributed.init_process_group
    torch.distributed.init_process_group = lambda backend=None, **k: init("gloo", **k)
    torch.nn.SyncBatchNorm.convert_sync_batchnorm = classmethod(lambda cls, module, *a, **k: module)
    ddp = torch.nn.parallel.DistributedDataParallel
    torch.nn.parallel.DistributedDataParallel = lambda module, **k: ddp(module)
    def compose(steps):
        def apply(x):
            for step in steps:
                x = step(x)
            return x
        return apply

    def normalize(mean, std):
        return lambda t: (t - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]

    transforms = types.SimpleNamespace(
        Compose=compose, Normalize=normalize,
        ToTensor=lambda: (lambda img: torch.from_numpy(np.array(img, np.float32) / 255).permute(2, 0, 1)),
        ColorJitter=lambda *a, **k: (lambda img: img), RandomGrayscale=lambda *a, **k: (lambda img: img))
    sys.modules["torchvision"] = types.SimpleNamespace(transforms=transforms)
    sys.modules["torchvision.transforms"] = transforms


def _quiet(*_):
    pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unimatch", type=Path, help="a UniMatch checkout (its unimatch.py); without it, ours only")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "work" / "unimatch-step",
                        help="generated images and runs (emptied first)")
    parser.add_argument("--results", type=Path, default=None, help="where the table goes (default: --out)")
    parser.add_argument("--crop", type=int, default=321)
    parser.add_argument("--batch", type=int, default=8, help="labeled images a step, as many unlabeled")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--cpu-dry-run", action="store_true", help="tiny, on the CPU: a check of the plumbing")
    args = parser.parse_args()
    if args.cpu_dry_run:
        args.crop, args.batch, args.warmup, args.steps, args.workers = 65, 2, 1, 2, 0
    out = args.out.resolve()
    if out.exists():  # finished runs would be reused, not timed
        shutil.rmtree(out)
    # UniMatch logs every (its steps // 8) steps: it needs 8 steps an epoch at least
    make_data(out / "data", max(2 * args.batch, 16), args.batch * max(8, args.warmup + args.steps + 2),
              (96, 128) if args.cpu_dry_run else (375, 500))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    results = (args.results or out).resolve()
    results.mkdir(parents=True, exist_ok=True)
    jobs = {"ours fp32": lambda: ours(out / "data", out / "ours", "none", args)}
    if device == "cuda":
        jobs["ours bf16"] = lambda: ours(out / "data", out / "ours", "bf16", args)
    if args.unimatch:
        jobs["UniMatch unimatch.py fp32"] = lambda: theirs(args.unimatch, out / "data", out / "theirs", args)
    rows: dict = {}
    for key, job in jobs.items():  # each row written as it comes: a later failure or kill keeps the earlier ones
        try:
            rows[key] = job()
        except Exception as exc:  # noqa: BLE001 (the table says what failed; the other rows still run)
            rows[key] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"{key}: FAILED: {rows[key]['error']}", file=sys.stderr, flush=True)
        write(results, name, rows, args)
    print((results / "unimatch-step.md").read_text())


def write(results: Path, device: str, rows: dict, args) -> None:
    lines = [f"One training step, {device}: DeepLabV3+ R101 (random init), crop {args.crop}, {args.batch} labeled + "
             f"{args.batch} unlabeled images, {args.steps} steps timed after {args.warmup}"
             + (" (CPU dry run: plumbing only)" if args.cpu_dry_run else "") + ":", "",
             "| code | images/s | peak memory GiB |", "|---|---|---|"]
    for key, r in rows.items():
        if "error" in r:
            lines.append(f"| {key} | failed: {r['error']} | |")
            continue
        memory = "-" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f}"
        lines.append(f"| {key} | {r['images_per_s']:.1f} | {memory} |")
    (results / "unimatch-step.json").write_text(json.dumps({"device": device, "args": {
        k: str(v) for k, v in vars(args).items()}, **rows}) + "\n")
    (results / "unimatch-step.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
