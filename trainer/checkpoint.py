"""Checkpoints: written atomically (a crash never leaves a torn file), read back with weights_only."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.atomic import atomic_write
from pipeline.errors import UserError
from pipeline.torchio import torch_load


def save_checkpoint(path: Path, state: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict:
    state = torch_load(path, "a checkpoint", "give a last.pt or best.pt of `conformalsam train`")
    if not isinstance(state, dict) or not {"model", "model_name", "classes"} <= set(state):
        raise UserError(f"{path}: not a checkpoint of `conformalsam train` (no model, model_name and classes); give "
                        "a last.pt or best.pt from <work>/runs/<name>/stage<N>/")
    return state


def load_trained(path: Path, classes) -> tuple[torch.nn.Module, dict]:
    """(model in eval mode, checkpoint) of a `conformalsam train` checkpoint made for these classes."""
    from trainer.models import build_model

    state = load_checkpoint(path)
    if state.get("classes") != list(classes):
        raise UserError(f"{path}: trained for classes {state.get('classes', [])[:4]}..., the data set has "
                        f"{list(classes)[:4]}...")
    model = build_model(state["model_name"], len(classes))
    model.load_state_dict(state["model"])
    return model.eval(), state
