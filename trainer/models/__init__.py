"""Segmentation networks: the built-in ones in plain torch, or the user's own, built by a factory.

Names: deeplabv3plus-r50 | deeplabv3plus-r101 (torchvision ResNet weights, e.g. resnet101-63fe2227.pth)
and segformer-b0 .. segformer-b5 (official MiT weights, mit_b0.pth .. mit_b5.pth); the `-tiny`
variants are small random-init models for tests and the toy world. Any other network: ``file.py:function``
or ``package.module:function``, called with the number of classes while its code folder is on sys.path
(docs/trainer.md 'Bring your own network').
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from pipeline.errors import UserError
from pipeline.factory import call_factory, fingerprint, is_factory, load_factory
from trainer.models.deeplabv3plus import DeepLabV3Plus
from trainer.models.segformer import SegFormer
from trainer.models.student import Segmenter, missing_protocol  # noqa: F401  (the trainer's view of a network)
from trainer.models.weights import load_backbone, load_init  # noqa: F401

DEEPLAB = {"deeplabv3plus-r50": "resnet50", "deeplabv3plus-r101": "resnet101", "deeplabv3plus-tiny": "resnet-tiny"}
SEGFORMER = {f"segformer-b{i}": f"mit-b{i}" for i in range(6)} | {"segformer-tiny": "mit-tiny"}
MODELS = (*DEEPLAB, *SEGFORMER)


def build_model(name: str, num_classes: int, code: Path | None = None, flag: str = "--model") -> nn.Module:
    """The network ``name`` (built in, or a factory spec whose code folder is ``code``); errors name ``flag``."""
    if is_factory(name):
        return build_factory(name, num_classes, code, flag)[0]
    if code is not None:
        raise UserError(f"--model-code {code}: only a factory (--model file.py:function) imports code; "
                        f"{name} is built in")
    if name in DEEPLAB:
        return DeepLabV3Plus(num_classes, DEEPLAB[name])
    if name in SEGFORMER:
        return SegFormer(num_classes, SEGFORMER[name])
    raise UserError(f"--model {name}: unknown model; choose one of {', '.join(MODELS)}, or give your own as "
                    "file.py:function or package.module:function")


def build_factory(spec: str, num_classes: int, code: Path | None, flag: str = "--model") -> tuple[nn.Module, dict]:
    """(the network the factory returns for ``num_classes``, its fingerprint for the checkpoint)."""
    factory = load_factory(spec, code, flag)
    model = call_factory(factory, spec, code, flag, num_classes)
    if not isinstance(model, nn.Module):
        raise UserError(f"{flag} {spec}: returned a {type(model).__name__}, not a torch.nn.Module")
    return model, fingerprint(factory, spec)


def factory_record(name: str, code: Path | None, flag: str = "--model") -> dict | None:
    """What a checkpoint records of a factory network's code (None for a built-in one)."""
    return fingerprint(load_factory(name, code, flag), name) if is_factory(name) else None
