"""What the trainer calls: any segmentation network behind one forward, logits at the input size.

A network maps normalised images (N, 3, H, W) to logits (N, K, h, w) at any output stride; `Segmenter`
resizes them to (H, W). UniMatch's feature perturbation needs the network split in two, the smallest
protocol that allows it:

    encode(images) -> features          a tensor, or a list, tuple or dict of tensors (N, C_i, h_i, w_i)
    decode(features) -> logits          the same structure in, (N, K, h, w) out

`Segmenter(x, perturb=True)` decodes the features twice, once as they are and once with channel dropout
(p 0.5) on every feature tensor, and returns both logits. The built-in models implement the protocol;
their ``forward`` is ``decode(encode(x))``.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import UserError
from pipeline.factory import is_factory

PROTOCOL = ("encode", "decode")


def missing_protocol(model: nn.Module) -> list[str]:
    """The methods of the encoder / decoder protocol that ``model`` lacks."""
    return [name for name in PROTOCOL if not callable(getattr(model, name, None))]


class Segmenter(nn.Module):
    """``model`` (registered as ``model``: the trainer saves ``segmenter.model.state_dict()``, the network's
    own keys) behind a forward that checks and resizes its logits; ``name`` is what errors call it."""

    def __init__(self, model: nn.Module, num_classes: int, name: str):
        super().__init__()
        self.model, self.num_classes, self.name = model, num_classes, name

    def forward(self, x: torch.Tensor, perturb: bool = False):
        with self._own_errors(x):
            if not perturb:
                return self._logits(self.model(x), x)
            features = self.model.encode(x)
            out = self._logits(self.model.decode(_doubled(features, self.training, self.name)), x, 2)
            return out.chunk(2)

    @contextmanager
    def _own_errors(self, x: torch.Tensor):
        """An exception inside a user's network (`--model file.py:function`) is that network's: one line naming it
        (CONFORMALSAM_DEBUG=1 prints the traceback too). The built-in networks' are the trainer's: raised as they
        are."""
        try:
            yield
        except Exception as exc:
            if isinstance(exc, UserError) or not is_factory(self.name):
                raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else "no message"
            hint = "" if os.environ.get("CONFORMALSAM_DEBUG") else " (CONFORMALSAM_DEBUG=1 shows the traceback)"
            raise UserError(f"--model {self.name}: the network raised {type(exc).__name__} on images "
                            f"{tuple(x.shape)}: {first}{hint}") from exc

    def _logits(self, out, x: torch.Tensor, copies: int = 1) -> torch.Tensor:
        n = x.shape[0] * copies
        if not (isinstance(out, torch.Tensor) and out.ndim == 4 and out.shape[0] == n
                and out.shape[1] == self.num_classes):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise UserError(f"--model {self.name}: returned {got} for images {tuple(x.shape)}; it must return "
                            f"logits (N, {self.num_classes}, h, w), one channel per class")
        if out.shape[-2:] != x.shape[-2:]:
            out = F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return out


def _doubled(features, training: bool, name: str):
    """Each feature tensor as [itself; itself with channel dropout], in the structure ``encode`` returned."""
    def double(f: torch.Tensor) -> torch.Tensor:
        return torch.cat([f, F.dropout2d(f, 0.5, training)])

    if isinstance(features, torch.Tensor):
        return double(features)
    if isinstance(features, dict):
        return type(features)((k, double(f)) for k, f in features.items())
    if isinstance(features, (list, tuple)):
        doubled = [double(f) for f in features]
        return features._make(doubled) if hasattr(features, "_make") else type(features)(doubled)  # namedtuples
    raise UserError(f"--model {name}: encode() returned a {type(features).__name__}; it must return a tensor, or a "
                    "list, tuple or dict of tensors")
