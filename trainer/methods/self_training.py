"""`--method self` (the default): ConformalSAM's self-reliance stage, FixMatch-style.

The teacher (the EMA teacher, else the model itself in eval mode) labels the weak view; the student learns
those labels where they are confident on the strong view, CutMix-ed with its neighbour in the batch, in the
same forward pass as the labeled images (shared BatchNorm statistics).
"""

from __future__ import annotations

import torch

from trainer.losses import Criterion, neighbour_mix

STRONG_VIEWS = 1
PERTURBS_FEATURES = False


@torch.no_grad()
def weak_labels(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(confidence, class) per pixel from ``model`` in eval mode, leaving its mode as it was."""
    was_training = model.training
    model.eval()
    conf, pseudo = model(images).float().softmax(1).max(1)
    model.train(was_training)
    return conf, pseudo


def losses(net, teacher, batch_l: dict, batch_u: dict, criterion: Criterion):
    conf, pseudo = weak_labels(teacher or getattr(net, "module", net), batch_u["image"])
    strong, pseudo, conf, valid = neighbour_mix(batch_u["box"], batch_u["strong"], pseudo, conf, batch_u["valid"])
    n = batch_l["image"].shape[0]
    logits = net(torch.cat([batch_l["image"], strong]))
    return (criterion.ce(logits[:n], batch_l["mask"], batch_l["valid"]),
            criterion.confident_ce(logits[n:], pseudo, conf, valid))
