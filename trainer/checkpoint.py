"""Checkpoints: written atomically (a crash never leaves a torn file), read back with weights_only."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.atomic import atomic_write
from pipeline.errors import UserError, describe
from pipeline.factory import difference
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


def model_code(state: dict) -> Path | None:
    """The code folder a checkpoint's factory network imports from."""
    code = (state.get("recipe") or {}).get("model_code")
    return Path(code) if code else None


def check_factory(state: dict, path: Path, current: dict | None = None) -> None:
    """A checkpoint of a factory network is used only with the factory code it was trained with; ``current``:
    that code's fingerprint now (computed when not given)."""
    recorded = state.get("factory")
    if recorded is None:
        return
    if current is None:
        from trainer.models import factory_record

        current = factory_record(state["model_name"], model_code(state), f"{path}: its network")
    changed = difference(recorded, current)
    if changed:
        raise UserError(f"{path}: the network's factory {state['model_name']} is not the code it was trained with: "
                        f"{changed}. Restore that file, or train a new run (--name)")


def load_trained(path: Path, classes) -> tuple[torch.nn.Module, dict]:
    """(the network of a `conformalsam train` checkpoint made for these classes, rebuilt and in eval mode,
    behind the trainer's `Segmenter` forward; the checkpoint)."""
    from trainer.models import Segmenter, build_model

    state = load_checkpoint(path)
    if state.get("classes") != list(classes):
        raise UserError(f"{path}: trained for classes {state.get('classes', [])[:4]}..., the data set has "
                        f"{list(classes)[:4]}...")
    check_factory(state, path)
    model = build_model(state["model_name"], len(classes), model_code(state), f"{path}: its network")
    load_weights(model, state["model"], path, state["model_name"])
    return Segmenter(model, len(classes), state["model_name"]).eval(), state


def load_weights(model: torch.nn.Module, weights: dict, path: Path, name: str) -> None:
    """``model.load_state_dict(weights)`` of a checkpoint; a misfit (the code that builds the network, e.g. the
    checkout a factory imports, changed since) is one line."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise UserError(f"{path}: its weights do not fit the network {name} builds now ({describe(exc)}); "
                        "restore the code it was trained with") from None
