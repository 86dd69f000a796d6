"""`--method unimatch`: UniMatch's weak-to-strong consistency (Yang et al., CVPR 2023), written from its
paper and public code.

One forward pass over labeled + weak unlabeled images also decodes the weak images' encoder features a
second time with channel dropout (p 0.5): the feature-perturbation branch. A second pass takes two strong
views of each unlabeled image, each with its own photometric draw and its own CutMix box. Pseudo-labels
are the weak view's predictions from the first pass, detached (or the EMA teacher's in eval mode, when
there is one), kept where confidence >= threshold. Unlabeled loss: 0.25 strong 1 + 0.25 strong 2 + 0.5
feature perturbation, UniMatch's weights; at l(t) = 0.5 the step equals UniMatch's (sup + unsup) / 2.

One deliberate difference: inside a CutMix box the pasted pixels come from the neighbouring image of the
same batch, with that image's weak-view pseudo-labels from the same pass, where UniMatch draws a second
unlabeled batch and labels it in a separate eval-mode pass. Same distribution of pairs, one pass fewer.
"""

from __future__ import annotations

import torch

from trainer.losses import Criterion, neighbour_mix
from trainer.methods.self_training import weak_labels

STRONG_VIEWS = 2
PERTURBS_FEATURES = True  # the network must have encode / decode (trainer.models.student)
WEIGHTS = {"strong_1": 0.25, "strong_2": 0.25, "feature": 0.5}  # UniMatch's


def losses(net, teacher, batch_l: dict, batch_u: dict, criterion: Criterion):
    n = batch_l["image"].shape[0]
    logits, perturbed = net(torch.cat([batch_l["image"], batch_u["image"]]), perturb=True)
    sup = criterion.ce(logits[:n], batch_l["mask"], batch_l["valid"])
    if teacher is None:
        conf, pseudo = logits[n:].detach().float().softmax(1).max(1)
    else:
        conf, pseudo = weak_labels(teacher, batch_u["image"])
    valid = batch_u["valid"]
    parts = {"feature": criterion.confident_ce(perturbed[n:], pseudo, conf, valid)}
    views = [neighbour_mix(batch_u[f"box{s}"], batch_u[f"strong{s}"], pseudo, conf, valid) for s in ("", "_2")]
    strong = net(torch.cat([v[0] for v in views])).chunk(2)
    for key, out, (_, p, c, v) in zip(("strong_1", "strong_2"), strong, views):
        parts[key] = criterion.confident_ce(out, p, c, v)
    return sup, sum(WEIGHTS[k] * parts[k] for k in WEIGHTS)
