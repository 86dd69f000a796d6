"""Starting weights from a local file: ImageNet weights for a backbone (`--backbone-weights`), or a whole
network's state dict (`--init-weights`) whose classifier may be for another class count."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.errors import UserError
from pipeline.torchio import state_fit, torch_load

# Keys an ImageNet checkpoint carries that a segmentation backbone has no use for (the classifier).
EXTRA_PREFIXES = ("fc.", "head.")
WRAPPERS = ("state_dict", "model", "module")
PREFIXES = ("module.", "backbone.", "encoder.")


def read_weights(path: Path, what: str, fix: str, own: set[str]) -> dict:
    """The state dict of ``path``: out of wrappers (``{"state_dict": ...}``, a `conformalsam train` checkpoint's
    ``{"model": ...}``, whatever else the file holds beside it) and without a prefix that every key shares
    (``module.`` of DataParallel, ``backbone.`` / ``encoder.``) unless the model's own keys ``own`` share it too."""
    state = torch_load(path, what, fix)
    while isinstance(state, dict) and not _tensors(state):
        inner = next((state[k] for k in WRAPPERS if isinstance(state.get(k), dict)), None)
        if inner is None:
            break
        state = inner
    if not (isinstance(state, dict) and state and _tensors(state)):
        raise UserError(f"{path}: expected a state dict (name -> tensor), got {type(state).__name__}"
                        f"{' of ' + ', '.join(map(str, list(state)[:4])) if isinstance(state, dict) else ''}; {fix}")
    for prefix in PREFIXES:
        if all(k.startswith(prefix) for k in state) and not all(k.startswith(prefix) for k in own):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _tensors(state: dict) -> bool:
    return bool(state) and all(isinstance(v, torch.Tensor) for v in state.values())


def load_backbone(model: nn.Module, path: Path) -> dict:
    """Load ImageNet weights into ``model.backbone``; a file that does not fit is a one-line error naming
    the missing / unexpected / mis-shaped keys. Returns counts of what was loaded and ignored."""
    path = Path(path)
    if not isinstance(getattr(model, "backbone", None), nn.Module):
        raise UserError(f"--backbone-weights {path}: the model has no `backbone` module to load them into; give "
                        "the whole network's weights with --init-weights instead")
    own = model.backbone.state_dict()
    state = read_weights(path, "backbone weights", "--backbone-weights takes torchvision ResNet or official "
                         "mit_b*.pth weights", set(own))
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


def load_init(model: nn.Module, path: Path, num_classes: int) -> dict:
    """Load a whole network's state dict into ``model``. Tensors whose shape differs in one dimension only, where
    the model has ``num_classes`` and the file one other count throughout (the classifier of a network trained
    on another label set), keep the model's fresh initialisation; anything else that does not fit is a
    one-line error. Returns {"loaded": count, "reinitialised": [names], "file_classes": count or None}."""
    path = Path(path)
    own = model.state_dict()
    state = read_weights(path, "a network's weights", "--init-weights takes a state dict of the whole network (e.g. "
                         "its published segmentation weights)", set(own))
    fit = state_fit(own, state)
    counts = {k: _class_count(own[k].shape, state[k].shape, num_classes) for k in fit.other_shape}
    by_class = [k for k, c in counts.items() if c is not None]
    classifier = by_class if len(set(counts.values())) == 1 and by_class and fit.fits else []
    missing = [k for k in fit.missing if not k.endswith("num_batches_tracked")]
    misfits = [k for k in fit.other_shape if k not in classifier]
    if misfits or missing or fit.unexpected:
        wrong = [k for k in misfits if k not in by_class] or misfits  # the most telling example first
        example = (f"e.g. {wrong[0]}: {tuple(state[wrong[0]].shape)} in the file, {tuple(own[wrong[0]].shape)} in "
                   "the model" if wrong else f"e.g. {(missing or fit.unexpected)[0]} "
                   f"{'missing' if missing else 'unexpected'}")
        raise UserError(f"{path}: does not fit the model: of the model's {len(own):,} tensors, fit {len(fit.fits):,}, "
                        f"another shape in the file {len(fit.other_shape)} (only by the class count {len(by_class)}),"
                        f" absent from the file {len(fit.missing)}; in the file but not in the model "
                        f"{len(fit.unexpected)} ({example}); give the weights of the same architecture")
    model.load_state_dict({**own, **fit.fits})
    return {"loaded": len(fit.fits), "reinitialised": classifier,
            "file_classes": counts[classifier[0]] if classifier else None}


def _class_count(mine: torch.Size, theirs: torch.Size, num_classes: int) -> int | None:
    """The file's class count when the shapes differ in exactly one dimension, where the model has
    ``num_classes``; else None (another architecture or width)."""
    if len(mine) != len(theirs):
        return None
    differ = [(m, t) for m, t in zip(mine, theirs) if m != t]
    return differ[0][1] if len(differ) == 1 and differ[0][0] == num_classes else None
