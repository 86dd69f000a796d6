"""Foundation-model backends behind one small protocol.

A backend turns class names + images into per-image class scores:

* ``preprocess``: a picklable `Preprocess` run in loader workers (resize, normalise) so the model
  never waits for JPEG decoding;
* ``predict(batch)``: (B, 3, H, W) on the device -> (B, K, h, w) scores at the model's native resolution;
* ``score_kind``: ``logits`` (softmax over classes gives probabilities), ``probabilities``, or
  ``scores`` (non-negative, unnormalised: SEEM's sem_seg);
* ``model_id`` and ``weights_sha256``: what the store records so it is never reused with another model.

The rest of the pipeline only calls `build_backend`; it never imports a specific backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.errors import UserError


@dataclass(frozen=True)
class Preprocess:
    """Image -> model input, on the CPU. ``short_side`` or ``fixed`` (H, W) resize; None keeps the size."""

    short_side: int | None = None
    fixed: tuple[int, int] | None = None
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    uint8: bool = False  # SEEM takes raw 0..255 pixels and normalises inside

    def size(self, height: int, width: int) -> tuple[int, int]:
        if self.fixed is not None:
            return self.fixed
        if self.short_side is not None:
            scale = self.short_side / min(height, width)
            return max(1, round(height * scale)), max(1, round(width * scale))
        return height, width

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        """uint8 (H, W, 3) -> (3, H', W'): uint8 as is, or float (x/255 - mean) / std."""
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        size = self.size(*image.shape[:2])
        if size != tuple(image.shape[:2]):
            x = F.interpolate(x[None].float(), size=size, mode="bilinear", align_corners=False, antialias=True)[0]
            x = x.round_().clamp_(0, 255)
        if self.uint8:
            return x.to(torch.uint8)
        x = x.float().div_(255)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (x - mean) / std


class Backend:
    name: str = ""
    score_kind: str = "logits"
    model_id: str = ""
    weights_sha256: str | None = None
    preprocess: Preprocess = Preprocess()
    autocast: bool = False  # fp16 autocast on CUDA

    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def build_backend(name: str, weights: Path | None, classes: tuple[str, ...], device: torch.device) -> Backend:
    """The named backend, loaded from local weights (a file or folder; a hub id for the hf backends)."""
    if name == "toy":
        from pipeline.backends.toy import ToyBackend as cls
    elif name == "torchscript":
        from pipeline.backends.torchscript import TorchScriptBackend as cls
    elif name == "seem":
        from pipeline.backends.seem import SeemBackend as cls
    elif name == "clipseg":
        from pipeline.backends.hf import ClipSegBackend as cls
    elif name == "sam3":
        from pipeline.backends.hf import Sam3Backend as cls
    else:
        raise UserError(f"--backend {name}: unknown backend (seem | sam3 | clipseg | torchscript | toy)")
    if weights is None:
        raise UserError(f"backend '{name}' needs weights: set foundation.weights in the config or pass --weights")
    return cls(Path(weights), classes, device)


# VOC-style names that are not words: what to say to a text encoder instead
PROMPTS = {"diningtable": "dining table", "pottedplant": "potted plant", "tvmonitor": "tv monitor",
           "aeroplane": "airplane"}


def prompts(classes: tuple[str, ...]) -> list[str]:
    """Class names as text prompts for the text-promptable backends."""
    return [PROMPTS.get(c, c.replace("_", " ")) for c in classes]


def require_file(path: Path, what: str) -> Path:
    if not Path(path).exists():
        raise UserError(f"{path}: {what} not found (set foundation.weights or --weights)")
    return Path(path)
