"""Foundation-model backends behind one small protocol.

A backend turns class names + images into per-image class scores:

* ``preprocess``: a picklable `Preprocess` run in loader workers (resize, normalise) so the model
  never waits for JPEG decoding;
* ``predict(batch)``: (B, 3, H, W) on the device -> (B, outputs, h, w) scores at the model's native
  resolution, one map per output: a text prompt (``prompted`` backends) or a model channel; the
  class map (pipeline.data.classmap) turns outputs into the data set's classes;
* ``score_kind``: ``logits`` (softmax over classes gives probabilities), ``probabilities``, or
  ``scores`` (non-negative, unnormalised: SEEM's sem_seg);
* ``fingerprint(weights)``: (model id, sha256 of the weights), what the store records so it is never reused
  with another model; known before the model is loaded, so a finished store costs no model load.

A new backend is one module here and one entry in `pipeline.config.BACKENDS`. The rest of the
pipeline only calls `resolve_backend` / `load_backend` (or `build_backend`, both at once); it
never imports a specific backend.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.data.classmap import NO_OBJECT, ClassMap, build_class_map
from pipeline.config import BACKENDS, Config
from pipeline.errors import UserError
from pipeline.torchio import torch_load


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
    weights_kind: str = "weights"  # what the weights are called in messages
    score_kind: str = "logits"
    preprocess: Preprocess = Preprocess()
    autocast: bool = False  # fp16 autocast on CUDA
    prompted: bool = False  # outputs are text prompts (any string); else fixed channels of a closed-set model
    no_object: bool = False  # a trailing no-object output follows the prompts (SEEM)
    notes: tuple[str, ...] = ()  # what loading found, for the user (e.g. checkpoint tensors loaded)
    warnings: tuple[str, ...] | list[str] = ()  # what loading found that may be wrong

    def __init__(self, weights: Path, outputs: tuple[str, ...], device: torch.device, config: Config):
        """``outputs``: the prompts to score (prompted backends) or the channel names expected from the model."""
        raise NotImplementedError

    @classmethod
    def fingerprint(cls, weights: Path, config: Config) -> tuple[str, str | None]:
        """(model id, sha256 of the weights file)."""
        from pipeline.stage0.store import file_sha256

        return f"{cls.name}:{Path(weights).name}", file_sha256(require_file(weights, cls.weights_kind))

    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) on the device -> (B, len(outputs), h, w) scores."""
        raise NotImplementedError


def backend_class(name: str) -> type[Backend]:
    """The backend registered under ``name`` in `pipeline.config.BACKENDS`, imported now."""
    if name not in BACKENDS:
        raise UserError(f"--backend {name}: unknown backend ({' | '.join(BACKENDS)})")
    module, _, cls = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def resolve_backend(config: Config, classes: tuple[str, ...]) -> tuple[type[Backend], ClassMap, Path]:
    """The configured backend's class, the map from its outputs to the data set's classes, its weights."""
    cls = backend_class(config.backend)
    mapping = build_class_map(classes, config, cls.prompted, cls.no_object)
    if config.weights is None:
        raise UserError(f"backend '{config.backend}' needs weights: set foundation.weights in the config or "
                        "pass --weights")
    return cls, mapping, Path(config.weights)


def load_backend(cls: type[Backend], mapping: ClassMap, weights: Path, device: torch.device,
                 config: Config) -> Backend:
    """The model, loaded from local weights (a file or folder; a hub id in the local cache for the hf ones)."""
    return cls(weights, tuple(o for o in mapping.outputs if o != NO_OBJECT), device, config)


def build_backend(config: Config, classes: tuple[str, ...], device: torch.device) -> tuple[Backend, ClassMap]:
    cls, mapping, weights = resolve_backend(config, classes)
    return load_backend(cls, mapping, weights, device, config), mapping


def checked_output(out, batch: torch.Tensor, outputs: tuple[str, ...], who: str) -> torch.Tensor:
    """A closed-set model's output, refused in one line unless it is (B, one channel per output, h, w)."""
    if not (isinstance(out, torch.Tensor) and out.ndim == 4 and out.shape[0] == batch.shape[0]):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(f"{who}: the model must return (B, C, h, w) logits, got {got}")
    if out.shape[1] != len(outputs):
        raise UserError(f"{who}: the model returns {out.shape[1]} channels, expected {len(outputs)} "
                        "(foundation.outputs, else the data set's classes)")
    return out


@torch.no_grad()
def probe_outputs(backend: "Backend", device: torch.device) -> None:
    """One forward pass on a blank image at the model's input size, so that a wrong channel count is found
    while loading, before `logits --force` removes an old store. A model that cannot take the blank image
    is left to the real images to judge."""
    height, width = backend.preprocess.size(64, 64)
    blank = backend.preprocess(np.zeros((height, width, 3), np.uint8))[None].to(device)
    try:
        out = backend.predict(blank)
    except UserError:
        raise
    except Exception:
        return
    checked_output(out, blank, backend.outputs, getattr(backend, "factory", None) or str(backend.weights))


def read_state_dict(path: Path) -> dict:
    """A plain state dict of tensors (or one under 'state_dict'), read without unpickling anything else."""
    state = torch_load(path, "a state dict", "check foundation.weights (--weights)")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not (isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise UserError(f"{path}: not a state dict of tensors")
    return state


def require_file(path: Path, what: str) -> Path:
    if not Path(path).exists():
        raise UserError(f"{path}: {what} not found (set foundation.weights or --weights)")
    return Path(path)
