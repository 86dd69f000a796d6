"""Train the toy annotator on the source domain (CPU, a few minutes, deterministic) and score it.

`make toy-annotator` runs this and rewrites pipeline/toy/annotator.pt. The source images are drawn
in memory from the generator (their seeds never overlap the written source val split).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from joblib import Parallel, delayed

from pipeline.metrics import confusion
from pipeline.toy.annotator import ToyAnnotator
from pipeline.toy.world import CLASSES, SOURCE, render, sample_rng


@dataclass(frozen=True)
class TrainSpec:
    seed: int = 0
    images: int = 2400
    iters: int = 700
    batch: int = 32
    lr: float = 3e-3
    width: int = 32


def _source_pool(spec: TrainSpec) -> tuple[np.ndarray, np.ndarray]:
    pairs = Parallel(n_jobs=-1, batch_size=64)(
        delayed(render)(SOURCE, sample_rng(spec.seed, "source", "train", i)) for i in range(spec.images)
    )
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255)


def full_res_logits(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    return F.interpolate(model(images), size=images.shape[-2:], mode="bilinear", align_corners=False)


def train_annotator(spec: TrainSpec = TrainSpec(), log=print) -> ToyAnnotator:
    torch.manual_seed(spec.seed)
    torch.use_deterministic_algorithms(True)
    start = time.perf_counter()
    images, masks = _source_pool(spec)
    log(f"source pool: {len(images)} images in {time.perf_counter() - start:.1f}s")
    model = ToyAnnotator(len(CLASSES), spec.width)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, spec.lr, total_steps=spec.iters, pct_start=0.1)
    gen = torch.Generator().manual_seed(spec.seed)
    model.train()
    for step in range(spec.iters):
        idx = torch.randint(len(images), (spec.batch,), generator=gen).numpy()
        x, y = to_tensor(images[idx]), torch.from_numpy(masks[idx]).long()
        if torch.rand((), generator=gen) < 0.5:  # flips: shapes have no preferred side
            x, y = x.flip(-1), y.flip(-1)
        loss = F.cross_entropy(full_res_logits(model, x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == spec.iters - 1:
            log(f"step {step:4d}  loss {loss.item():.3f}  {time.perf_counter() - start:.0f}s")
    return model.eval()


@torch.no_grad()
def confusion_on(model: torch.nn.Module, pairs, num_classes: int, batch: int = 64) -> np.ndarray:
    """Confusion matrix of the model's full-resolution argmax over (image, mask) pairs."""
    conf = np.zeros((num_classes, num_classes), dtype=np.int64)
    pairs = list(pairs)
    for i in range(0, len(pairs), batch):
        chunk = pairs[i : i + batch]
        x = to_tensor(np.stack([p[0] for p in chunk]))
        pred = full_res_logits(model, x).argmax(1)
        conf += confusion(pred, np.stack([p[1] for p in chunk]), num_classes)
    return conf
