"""Stage II methods: how the unlabeled images teach the model once the cached masks are dropped.

Each method is a module with

* ``STRONG_VIEWS``: how many strong views (each with its own CutMix box) it needs per unlabeled image;
* ``PERTURBS_FEATURES``: whether it calls ``net(images, perturb=True)``, which needs a network with the
  encode / decode protocol (`trainer.models.student`); the trainer refuses other networks up front;
* ``losses(net, teacher, batch_l, batch_u, threshold) -> (sup, unsup)``: the labeled and unlabeled losses
  of one step. ``net`` is the student as trained (possibly DDP-wrapped); ``teacher`` the EMA teacher, or
  None when there is none; both are `trainer.models.Segmenter`s (logits at the input size). The stage loop weighs them, L = (1 - l(t)) sup + l(t) unsup, for every method.

A new method is one more module here and one entry in METHODS.
"""

from __future__ import annotations

from types import ModuleType

from pipeline.errors import UserError
from trainer.methods import self_training, unimatch

METHODS: dict[str, ModuleType] = {"self": self_training, "unimatch": unimatch}


def get_method(name: str) -> ModuleType:
    if name not in METHODS:
        raise UserError(f"--method {name}: unknown stage II method; choose one of {', '.join(METHODS)}")
    return METHODS[name]
