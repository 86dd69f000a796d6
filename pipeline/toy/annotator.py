"""The toy world's foundation model: a small fully convolutional net trained on the source domain.

It maps float RGB in [0, 1] (B, 3, H, W) to class logits at 1/4 resolution (B, K, H/4, W/4),
like SEEM whose masks live at 1/4 of its input. Weights ship in the package, pipeline/toy/annotator.pt.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.errors import UserError

FORMAT = "conformalsam-toy-annotator"
STRIDE = 4


def _block(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ToyAnnotator(nn.Module):
    def __init__(self, num_classes: int, width: int = 32):
        super().__init__()
        w = width
        self.stem = nn.Sequential(_block(3, w, 2), _block(w, w), _block(w, 2 * w, 2))
        # dilated context: a receptive field wide enough for the largest objects at 1/4 scale
        self.context = nn.ModuleList(_block(2 * w, 2 * w, dilation=d) for d in (2, 4, 8, 2))
        self.head = nn.Conv2d(2 * w, num_classes, 1)
        self.register_buffer("mean", torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.25, 0.25, 0.25]).view(1, 3, 1, 1))

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        x = self.stem((rgb - self.mean) / self.std)
        for block in self.context:
            x = x + block(x)  # residual: keeps training stable and fast
        return self.head(x)


def save_annotator(path: Path, model: ToyAnnotator, classes: tuple[str, ...], meta: dict) -> None:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"format": FORMAT, "classes": list(classes), "width": model.head.in_channels // 2,
                "meta": meta, "state_dict": state}, path)


def load_annotator(path: Path) -> tuple[ToyAnnotator, tuple[str, ...]]:
    """The annotator in eval mode and its class names; a clear error for a wrong or broken file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: toy annotator weights not found (run `make toy-annotator` to retrain them)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling failure means the file is not ours
        raise UserError(f"{path}: not a readable torch file ({type(exc).__name__}); expected toy annotator weights")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path}: not a toy annotator checkpoint (no '{FORMAT}' format tag)")
    classes = tuple(ckpt["classes"])
    model = ToyAnnotator(len(classes), ckpt["width"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), classes
