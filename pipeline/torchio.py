"""Reading the PyTorch files users give (checkpoints, state dicts, backbone weights): tensors only
(`weights_only`), and every failure one line naming the file, what it should be and what to do, instead
of torch's multi-line advice to unpickle untrusted code."""

from __future__ import annotations

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
