"""Checkpoints: written atomically (a crash never leaves a torn file), read back with weights_only."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.atomic import atomic_write
from pipeline.errors import UserError


def save_checkpoint(path: Path, state: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(Path(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: checkpoint not found") from None
    except Exception as exc:
        raise UserError(f"{path}: cannot read checkpoint ({exc})") from None
