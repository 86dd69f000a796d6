"""Stage II methods: how the unlabeled images teach the model once the cached masks are dropped.

Each method is a module with

* ``STRONG_VIEWS``: how many strong views (each with its own CutMix box) it needs per unlabeled image;
* ``PERTURBS_FEATURES``: whether it calls ``net(images, perturb=True)``, which needs a network with the
  encode / decode protocol (`trainer.models.student`); the trainer refuses other networks up front;
* ``losses(net, teacher, batch_l, batch_u, criterion) -> (sup, unsup)``: the labeled and unlabeled losses
  of one step. ``net`` is the student as trained (possibly DDP-wrapped); ``teacher`` the EMA teacher, or
  None when there is none; both are `trainer.models.Segmenter`s (logits at the input size). ``criterion``
  (`trainer.losses.Criterion`) gives the run's cross-entropies, ``criterion.ce`` against labels and
  ``criterion.confident_ce`` against pseudo-labels at the recipe's threshold, both with the recipe's class
  weights. The stage loop weighs the two, L = (1 - l(t)) sup + l(t) unsup, for every method.

What a step receives (`trainer.data.TrainImages`, on the step's device; B images per process, crop C):

* ``batch_l``, the labeled images: ``image`` (B, 3, C, C) float, normalised; ``mask`` (B, C, C) long,
  class ids with 255 = ignore; ``valid`` (B, C, C) bool, False where the crop is padding (neither a class
  nor ignore: count no loss there).
* ``batch_u``, the unlabeled images, no label: ``image`` the weak view (the same random scale, crop and flip
  as every view, no photometric change), ``valid`` as above, and per strong view (``STRONG_VIEWS`` of
  them) ``strong`` / ``strong_2`` / ... (B, 3, C, C): the weak view recoloured (colour jitter, grayscale,
  blur), and ``box`` / ``box_2`` / ... (B, C, C) bool: that view's CutMix region, empty for about half the
  images. The trainer does not mix: `trainer.losses.neighbour_mix(box, strong, pseudo, conf, valid)`
  pastes image i-1's content inside image i's box into every tensor given (views, pseudo-labels,
  confidences, validity alike), as UniMatch mixes within its batch.

Every draw (crop, flip, colours, boxes) depends only on the seed, epoch and image, so a resumed run and
any number of processes or loader workers see the same batches.

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
