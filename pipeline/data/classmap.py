"""Data set classes from a model's outputs: one mechanism for text prompts and closed-set models.

A backend scores one map per *output*: a text prompt (SEEM, CLIPSeg, SAM 3) or a channel of a model
trained on another label set (TorchScript: e.g. the 19 Cityscapes classes). Each data set class takes
the sum of its outputs' probabilities (SEEM: of its prompts' scores, the same sum per query); a class
with no output gets zero. An output no class takes is dropped: for probabilities (logits, softmax)
its mass is not redistributed, so a pixel the model gives to such an output has low probability for
every class and calibration filters it out; SEEM's scores are normalised over the classes when read,
as SEEM's own evaluation drops its no-object entry. An output may serve one class only.

Where every class is its own output, in order, the scores are stored as the model gives them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.data.prompts import prompts_for

NO_OBJECT = "<no-object>"  # SEEM's trailing vocabulary entry: "none of the given classes"


@dataclass(frozen=True)
class ClassMap:
    outputs: tuple[str, ...]  # what the backend produces, in order
    groups: tuple[tuple[int, ...], ...]  # per data set class: the outputs it sums

    @property
    def identity(self) -> bool:
        """Every output is one class, in order: the scores pass through unchanged."""
        return self.groups == tuple((i,) for i in range(len(self.outputs)))

    def describe(self, classes: tuple[str, ...]) -> dict | None:
        """What the store records: None where each class is the output of its own name (older stores stay
        valid); else the outputs in order and class -> outputs, so that other prompts, channels or channel
        orders make another store."""
        if self.identity and self.outputs == tuple(classes):
            return None
        return {"outputs": list(self.outputs),
                "classes": {c: [self.outputs[i] for i in group] for c, group in zip(classes, self.groups)}}

    def score_kind(self, kind: str) -> str:
        """The kind of what `apply` returns: sums of SEEM scores stay scores, the rest become probabilities."""
        return kind if self.identity or kind == "scores" else "probabilities"

    def apply(self, scores: torch.Tensor, kind: str) -> torch.Tensor:
        """(B, outputs, h, w) of the given kind -> (B, classes, h, w)."""
        if self.identity:
            return scores
        if scores.shape[1] != len(self.outputs):
            raise ValueError(f"backend returned {scores.shape[1]} outputs, the class map expects {len(self.outputs)}")
        scores = scores.float().softmax(1) if kind == "logits" else scores.float()
        out = scores.new_zeros((scores.shape[0], len(self.groups), *scores.shape[2:]))
        for k, group in enumerate(self.groups):
            if group:
                out[:, k] = scores[:, list(group)].sum(1)
        return out


def build_class_map(classes: tuple[str, ...], config: Config, prompted: bool, no_object: bool) -> ClassMap:
    """The map of a data set's classes onto a backend's outputs.

    ``prompted``: the backend takes text prompts (any string is an output); otherwise its outputs are
    fixed channels named by ``foundation.outputs`` (default: the data set's classes, one each).
    ``no_object``: the backend also returns SEEM's trailing no-object entry as its last output.
    """
    explicit = dict(config.class_map)
    unknown = [name for name in explicit if name not in classes]
    if unknown:
        raise UserError(f"{config.source}: foundation.map names {unknown}, not classes of the data set "
                        f"({', '.join(classes)})")
    if prompted:
        if config.outputs is not None:
            raise UserError(f"{config.source}: foundation.outputs names a closed-set model's channels; backend "
                            f"'{config.backend}' takes text prompts: give them in [foundation.map]")
        names = [explicit[c] if c in explicit else _default_prompts(c, config, no_object) for c in classes]
        if not no_object and any(NO_OBJECT in n for n in names):
            raise UserError(f"{config.source}: '{NO_OBJECT}' in foundation.map is SEEM's; backend "
                            f"'{config.backend}' has no no-object output")
        prompts = list(dict.fromkeys(p for n in names for p in n if p != NO_OBJECT))
        if not prompts:
            raise UserError(f"{config.source}: foundation.map leaves no text prompt to score")
        outputs = tuple(prompts) + ((NO_OBJECT,) if no_object else ())
    else:
        outputs = tuple(config.outputs) if config.outputs is not None else tuple(classes)
        repeated = sorted({o for o in outputs if outputs.count(o) > 1})
        if repeated:
            raise UserError(f"{config.source}: foundation.outputs names {repeated} more than once")
        names = [explicit[c] if c in explicit else ((c,) if c in outputs else ()) for c in classes]
        missing = sorted({n for group in names for n in group if n not in outputs})
        if missing:
            raise UserError(f"{config.source}: foundation.map names {missing}, not outputs of the model "
                            f"(foundation.outputs: {', '.join(outputs)})")
    owners: dict[str, list[str]] = {}
    for name, group in zip(classes, names):
        for output in dict.fromkeys(group):
            owners.setdefault(output, []).append(name)
    shared = {o: c for o, c in owners.items() if len(c) > 1}
    if shared:
        output, names_ = next(iter(shared.items()))
        raise UserError(f"{config.source}: '{output}' is given to classes {names_}: an output (prompt or model "
                        "channel) can serve one class only, or its probability would be counted twice")
    index = {name: i for i, name in enumerate(outputs)}
    return ClassMap(outputs, tuple(tuple(index[n] for n in dict.fromkeys(group)) for group in names))


def _default_prompts(name: str, config: Config, no_object: bool) -> tuple[str, ...]:
    # SEEM learned its trailing "background" entry as "none of the given classes": by default the data
    # set's own background class takes it whole, instead of sharing it with an identical prompt.
    if no_object and config.background == "no-object" and name.lower() == "background":
        return (NO_OBJECT,)
    return prompts_for(name)


def unmapped(classes: tuple[str, ...], mapping: ClassMap) -> list[str]:
    """Classes no output scores (always zero): worth a warning."""
    return [c for c, group in zip(classes, mapping.groups) if not group]
