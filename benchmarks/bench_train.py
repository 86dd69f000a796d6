"""`make bench-train`: training throughput and peak memory of a stage-I step.

A step is what `conformalsam train --stage 1` does per batch: one forward over B labeled + B unlabeled
crops, the two cross-entropies, backward, optimiser step (random init, synthetic tensors, so the data
loader is out of the measurement). On CPU: the toy model. On a GPU, in addition: DeepLabV3+ R101 at
crop 321 and SegFormer-B5 at crop 513, batch 8, AMP (bf16) and channels-last. Each configuration runs
in its own process; peak memory is the process's peak RSS (CPU) or torch's peak allocation (GPU).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.isolated import measure  # noqa: E402
from trainer.models import build_model  # noqa: E402
from trainer.losses import Criterion  # noqa: E402
from trainer.stages import _stage1_losses  # noqa: E402

CPU_CONFIGS = [("deeplabv3plus-tiny", 96, 8)]
GPU_CONFIGS = [("deeplabv3plus-r101", 321, 8), ("segformer-b5", 513, 8)]


def job(model_name: str, crop: int, batch: int, device: str, steps: int, warmup: int, fast: bool = True) -> dict:
    """``fast``: on a GPU, bf16 autocast and channels-last (what the trainer does); else fp32, contiguous."""
    dev = torch.device(device)
    torch.manual_seed(0)
    model = build_model(model_name, 21).to(dev)
    cuda = dev.type == "cuda"
    fast = fast and cuda
    if cuda:
        torch.backends.cudnn.benchmark = True
        # fp32 means fp32: no TF32 tensor-core rounding in the baseline
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = fast
    if fast:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)

    def batch_of():
        fmt = torch.channels_last if fast else torch.contiguous_format
        return {"image": torch.randn(batch, 3, crop, crop, device=dev).contiguous(memory_format=fmt),
                "mask": torch.randint(0, 21, (batch, crop, crop), device=dev),
                "valid": torch.ones(batch, crop, crop, dtype=torch.bool, device=dev)}

    data = [(batch_of(), batch_of()) for _ in range(2)]
    model.train()
    for i in range(warmup + steps):
        if i == warmup:
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
        lab, unl = data[i % 2]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=fast):
            sup, unsup = _stage1_losses(model, lab, unl, Criterion())
            loss = 0.5 * sup + 0.5 * unsup
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    out = {"images_per_s": 2 * batch * steps / seconds, "step_ms": 1000 * seconds / steps}
    if cuda:
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["gpu"] = torch.cuda.get_device_name()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--job", nargs="+", help=argparse.SUPPRESS)  # model crop batch device [fp32]
    args = parser.parse_args()
    if args.job:
        model, crop, batch, device = args.job[:4]
        warmup = 3 if device == "cpu" else 10
        print(json.dumps(job(model, int(crop), int(batch), device, args.steps, warmup, args.job[4:] != ["fp32"])))
        return
    configs = [(*c, "cpu") for c in CPU_CONFIGS]
    if torch.cuda.is_available():
        configs += [(*c, "cuda") for c in GPU_CONFIGS]
    else:
        print("no CUDA device: GPU configurations (DeepLabV3+ R101 crop 321, SegFormer-B5 crop 513) skipped")
    print(f"stage-I training step (B labeled + B unlabeled crops), {args.steps} timed steps, "
          f"{torch.get_num_threads()} CPU threads")
    print(f"{'model':22s}{'device':>7s}{'crop':>6s}{'batch':>7s}{'images/s':>10s}{'ms/step':>9s}{'peak MB':>10s}")
    for model, crop, batch, device in configs:
        result, rss = measure(__file__, [model, str(crop), str(batch), device])
        peak = result.get("peak_gpu_mb", rss)
        label = "GPU" if device == "cuda" else "RSS"
        print(f"{model:22s}{device:>7s}{crop:6d}{f'{batch}+{batch}':>7s}{result['images_per_s']:10.1f}"
              f"{result['step_ms']:9.0f}{peak:10.0f} ({label}{', bf16 AMP, ' + result['gpu'] if 'gpu' in result else ''})")


if __name__ == "__main__":
    main()
