"""Training recipes: the anchors' settings as named presets, every field overridable from the CLI.

Learning-rate rule: ``lr`` is given for a total batch of 8 (the batch UniMatch, AllSpark and the
paper train with: 2 per GPU x 4 GPUs). The effective rate is lr x total_batch / 8 (linear scaling),
where total_batch = batch per process x processes, so one GPU with batch 2 does not silently train
at the rate meant for 8. The head (everything but the backbone) uses head_lr_mult x that rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from pathlib import Path

from pipeline.errors import UserError

REFERENCE_BATCH = 8
CLASS_WEIGHTS = ("none", "median-frequency", "enet")


@dataclass(frozen=True)
class Recipe:
    model: str = "deeplabv3plus-r101"  # a built-in name, or a factory: "file.py:function" / "package.module:function"
    crop: int = 321
    batch_size: int = 8  # labeled images per step, all processes together; as many unlabeled
    epochs: tuple[int, int] = (60, 20)  # stage I, stage II (an epoch = one pass over the unlabeled set)
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 1e-3  # at a total batch of 8
    head_lr_mult: float = 10.0
    weight_decay: float = 1e-4
    momentum: float = 0.9
    poly_power: float = 0.9
    scale_range: tuple[float, float] = (0.5, 2.0)
    class_weights: str = "none"  # none | median-frequency | enet: weights of every cross-entropy, from the labeled masks
    threshold: float = 0.95  # stage II: pseudo-labels below this confidence are ignored
    ema: float = 0.0  # stage II teacher: 0 = the model itself; e.g. 0.996 = an EMA teacher
    lambda_start: float = 0.5  # weight of the unlabeled loss: L = (1 - l(t)) L_sup + l(t) L_unsup
    lambda_end: float = 0.1
    lambda_schedule: str = "exp"  # exp | linear | constant
    eval_mode: str = "whole"  # whole | sliding
    eval_from: float = 0.0  # validate only after this fraction of the stage's epochs (and always at the end)
    backbone_weights: Path | None = None  # ImageNet weights of the backbone
    init_weights: Path | None = None  # the whole network's weights (a classifier for another class count is redone)
    model_code: Path | None = None  # the folder a factory network (model = "file.py:function") imports from
    amp: str = "bf16"  # on GPU: bf16 | fp16 | none (CPU always runs fp32)
    seed: int = 0
    workers: int = 4

    @property
    def labeled_only(self) -> bool:
        """Lambda 0 throughout: stage I's unlabeled images only pass through BatchNorm, so it reads no masks."""
        return self.lambda_start == 0 and self.lambda_end == 0

    def check(self) -> "Recipe":
        choices = {"optimizer": ("sgd", "adamw"), "lambda_schedule": ("exp", "linear", "constant"),
                   "class_weights": CLASS_WEIGHTS,
                   "eval_mode": ("whole", "sliding"), "amp": ("bf16", "fp16", "none")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)}: choose one of {', '.join(allowed)}")
        if self.crop < 32 or self.batch_size < 1 or min(self.epochs) < 0:
            raise UserError("--crop must be >= 32, --batch-size >= 1 and epochs >= 0")
        if self.init_weights and self.backbone_weights:
            raise UserError("--init-weights loads the whole network, --backbone-weights its backbone: give one")
        if not 0 <= self.eval_from < 1:
            raise UserError(f"--eval-from {self.eval_from}: a fraction of the epochs in [0, 1)")
        if not 0 <= self.ema < 1 or not 0 <= self.threshold <= 1:
            raise UserError("--ema must be in [0, 1) and --threshold in [0, 1]")
        if not (0 <= self.lambda_start <= 1 and 0 <= self.lambda_end <= 1):
            raise UserError("--lambda-start and --lambda-end must be in [0, 1]")
        positive = {"lr": self.lr, "head_lr_mult": self.head_lr_mult, "poly_power": self.poly_power}
        non_negative = {"weight_decay": self.weight_decay, "momentum": self.momentum}
        for name, value in {**positive, **non_negative}.items():  # NaN fails every comparison: caught here
            if not (math.isfinite(value) and (value > 0 if name in positive else value >= 0)):
                raise UserError(f"--{name.replace('_', '-')} {value}: must be a finite number "
                                f"{'> 0' if name in positive else '>= 0'}")
        if not all(math.isfinite(v) and v > 0 for v in self.scale_range) or self.scale_range[0] > self.scale_range[1]:
            raise UserError(f"scale_range {self.scale_range}: two finite numbers > 0, low <= high")
        return self


RECIPES = {
    # The toy world: a tiny DeepLabV3+ from scratch, minutes on 2 CPU cores.
    "toy": Recipe(model="deeplabv3plus-tiny", crop=96, batch_size=8, epochs=(6, 3), optimizer="adamw", lr=2e-3,
                  head_lr_mult=1.0, weight_decay=1e-4, scale_range=(0.75, 1.5), workers=1),
    # CamVid on 2 CPU cores (make bench-real): the toy network from scratch on 128 x 128 crops at 0.5-1x scale.
    "camvid-tiny": Recipe(model="deeplabv3plus-tiny", crop=128, batch_size=8, epochs=(16, 5), optimizer="adamw",
                          lr=2e-3, head_lr_mult=1.0, weight_decay=1e-4, scale_range=(0.5, 1.0), workers=1),
    # UniMatch's VOC recipe (DeepLabV3+ R101, crop 321 or 513) on the paper's 60 + 20 epoch schedule.
    "voc-r101-321": Recipe(),
    "voc-r101-513": Recipe(crop=513),
    # AllSpark's / the paper's network: SegFormer (MiT-B5), crop 513.
    "voc-segformer-b5": Recipe(model="segformer-b5", crop=513),
    # ADE20K: 30 + 10 epochs, crop 512.
    "ade20k-segformer-b5": Recipe(model="segformer-b5", crop=512, epochs=(30, 10)),
    "ade20k-r101": Recipe(crop=513, epochs=(30, 10)),
    # UniMatch's Cityscapes recipe (240 epochs, lr 0.005, head x1, crop 801; val by sliding window over the
    # whole 1024 x 2048 images), split 3:1 into stages as on VOC. UniMatch's OHEM loss is not implemented.
    "cityscapes-r101": Recipe(crop=801, epochs=(180, 60), lr=5e-3, head_lr_mult=1.0, eval_mode="sliding"),
    # UniMatch's COCO recipe (30 epochs, lr 0.004, head x10, crop 513; it trains Xception-65, R101 here).
    "coco-r101": Recipe(crop=513, epochs=(24, 6), lr=4e-3),
}
DEFAULT_FOR_FORMAT = {"folder": "toy", "voc": "voc-r101-321", "ade20k": "ade20k-segformer-b5", "camvid": "camvid-tiny",
                      "cityscapes": "cityscapes-r101", "coco": "coco-r101"}


def get_recipe(name: str | None, data_format: str, **overrides) -> tuple[str, Recipe]:
    name = name or DEFAULT_FOR_FORMAT.get(data_format, "toy")
    if name not in RECIPES:
        raise UserError(f"--recipe {name}: unknown; choose one of {', '.join(RECIPES)}")
    known = {f.name for f in fields(Recipe)}
    changes = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(changes) - known
    if unknown:
        raise ValueError(f"unknown recipe fields {unknown}")
    return name, replace(RECIPES[name], **changes).check()


def effective_lr(recipe: Recipe, total_batch: int) -> float:
    return recipe.lr * total_batch / REFERENCE_BATCH
