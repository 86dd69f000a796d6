"""Validation: mIoU and per-class IoU, on whole images or with a sliding window."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline.metrics import confusion, iou_per_class, mean_iou, pixel_accuracy


@torch.no_grad()
def predict(model: torch.nn.Module, image: torch.Tensor, mode: str = "whole", crop: int = 513) -> torch.Tensor:
    """Class probabilities (B, K, H, W) of normalised images (B, 3, H, W).

    ``sliding``: crop x crop windows at stride 2/3 crop covering the image (the last window flush with
    the border), probabilities averaged where windows overlap; an image smaller than the crop is padded
    and the padding cut off again.
    """
    if mode == "whole":
        return model(image).float().softmax(1)
    h, w = image.shape[-2:]
    ph, pw = max(crop - h, 0), max(crop - w, 0)
    padded = F.pad(image, (0, pw, 0, ph))
    H, W = padded.shape[-2:]
    stride = max(1, crop * 2 // 3)
    tops = sorted({*range(0, H - crop, stride), H - crop})
    lefts = sorted({*range(0, W - crop, stride), W - crop})
    total = counts = None
    for top in tops:
        for left in lefts:
            probs = model(padded[..., top:top + crop, left:left + crop]).float().softmax(1)
            if total is None:
                total = padded.new_zeros(image.shape[0], probs.shape[1], H, W)
                counts = padded.new_zeros(1, 1, H, W)
            total[..., top:top + crop, left:left + crop] += probs
            counts[..., top:top + crop, left:left + crop] += 1
    return (total / counts)[..., :h, :w]


def evaluate(model: torch.nn.Module, val_set, num_classes: int, device: torch.device, mode: str = "whole",
             crop: int = 513, autocast=None, rank: int = 0, world: int = 1, progress=None) -> dict:
    """Confusion over the val set (each process takes every world-th image; summed across processes)."""
    was_training, benchmark = model.training, torch.backends.cudnn.benchmark
    model.eval()
    torch.backends.cudnn.benchmark = False  # val images vary in size: re-tuning per shape costs more than it saves
    conf = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for index in range(rank, len(val_set), world):
        image, mask = val_set[index]
        with autocast() if autocast else torch.autocast("cpu", enabled=False):
            probs = predict(model, image[None].to(device), mode, crop)
        conf += torch.from_numpy(confusion(probs.argmax(1).cpu(), mask[None], num_classes))
        if progress:
            progress(1)
    if dist.is_initialized():
        conf = conf.to(device) if dist.get_backend() == "nccl" else conf
        dist.all_reduce(conf)
        conf = conf.cpu()
    model.train(was_training)
    torch.backends.cudnn.benchmark = benchmark
    return scores(conf.numpy())


def scores(conf: np.ndarray) -> dict:
    return {"miou": mean_iou(conf), "pixel_accuracy": pixel_accuracy(conf),
            "iou": [None if np.isnan(v) else float(v) for v in iou_per_class(conf)]}
