"""Segmentation models in plain torch, and loading ImageNet backbone weights from a local file.

Names: deeplabv3plus-r50 | deeplabv3plus-r101 (torchvision ResNet weights, e.g. resnet101-63fe2227.pth)
and segformer-b0 .. segformer-b5 (official MiT weights, mit_b0.pth .. mit_b5.pth); the `-tiny`
variants are small random-init models for tests and the toy world.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.errors import UserError
from pipeline.torchio import torch_load
from trainer.models.deeplabv3plus import DeepLabV3Plus
from trainer.models.segformer import SegFormer

DEEPLAB = {"deeplabv3plus-r50": "resnet50", "deeplabv3plus-r101": "resnet101", "deeplabv3plus-tiny": "resnet-tiny"}
SEGFORMER = {f"segformer-b{i}": f"mit-b{i}" for i in range(6)} | {"segformer-tiny": "mit-tiny"}
MODELS = (*DEEPLAB, *SEGFORMER)
# Keys an ImageNet checkpoint carries that a segmentation backbone has no use for (the classifier).
EXTRA_PREFIXES = ("fc.", "head.")
WRAPPERS = ("state_dict", "model", "module")
PREFIXES = ("module.", "backbone.", "encoder.")


def build_model(name: str, num_classes: int) -> nn.Module:
    if name in DEEPLAB:
        return DeepLabV3Plus(num_classes, DEEPLAB[name])
    if name in SEGFORMER:
        return SegFormer(num_classes, SEGFORMER[name])
    raise UserError(f"--model {name}: unknown model; choose one of {', '.join(MODELS)}")


def load_backbone(model: nn.Module, path: Path) -> dict:
    """Load ImageNet weights into ``model.backbone``; a file that does not fit is a one-line error naming
    the missing / unexpected / mis-shaped keys. Returns counts of what was loaded and ignored."""
    path = Path(path)
    state = torch_load(path, "backbone weights", "--backbone-weights takes torchvision ResNet or official "
                       "mit_b*.pth weights")
    while isinstance(state, dict) and len(state) <= 3 and any(k in state for k in WRAPPERS):
        state = next(state[k] for k in WRAPPERS if k in state)
    if not isinstance(state, dict):
        raise UserError(f"{path}: expected a state dict (name -> tensor), got {type(state).__name__}")
    for prefix in PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    own = model.backbone.state_dict()
    ignored = [k for k in state if k not in own and k.startswith(EXTRA_PREFIXES)]
    unexpected = [k for k in state if k not in own and k not in ignored]
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"{len(v)} {what} (first: {', '.join(v[:4])})" for what, v in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)) if v]
        raise UserError(f"{path}: does not fit the {type(model.backbone).__name__} backbone: {'; '.join(parts)}. "
                        "Use torchvision ResNet weights for deeplabv3plus-r*, official mit_b*.pth for segformer-b*")
    model.backbone.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return {"loaded": len(own), "ignored": len(ignored)}
