"""Reading the PyTorch files users give (checkpoints, state dicts, backbone weights): tensors only
(`weights_only`), and every failure one line naming the file, what it should be and what to do, instead
of torch's multi-line advice to unpickle untrusted code; and how such a state dict fits a model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.errors import UserError, describe


def torch_load(path: Path, what: str, fix: str):
    """``torch.load(path)`` of a file of tensors; ``what`` it should be (e.g. "a trainer checkpoint") and
    the ``fix`` (e.g. "give a last.pt or best.pt of `conformalsam train`") go into the error."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: not found; {fix}")
    if path.is_dir():
        raise UserError(f"{path}: is a folder, not {what}; {fix}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling arbitrary bytes fails in many ways (UnpicklingError, IndexError, ...)
        reason = describe(exc) if isinstance(exc, OSError) else "damaged, or not a PyTorch file of tensors"
        raise UserError(f"{path}: cannot be read as {what} ({reason}); {fix}") from None


@dataclass(frozen=True)
class StateFit:
    """How a checkpoint's tensors fit a model's state dict."""

    fits: dict  # name -> tensor of the model's shape
    other_shape: list[str]
    missing: list[str]  # the model's tensors not in the checkpoint
    unexpected: list[str]  # the checkpoint's tensors the model does not have

    def example(self, state: dict, own: dict) -> str:
        if self.other_shape:
            k = self.other_shape[0]
            return f"e.g. {k}: {tuple(state[k].shape)} in the checkpoint, {tuple(own[k].shape)} in the model"
        return f"e.g. {self.missing[0]} missing" if self.missing else f"e.g. {self.unexpected[0]} unexpected"


def state_fit(own: dict, state: dict) -> StateFit:
    fits = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    return StateFit(fits, [k for k in state if k in own and state[k].shape != own[k].shape],
                    [k for k in own if k not in fits and k not in state], [k for k in state if k not in own])
