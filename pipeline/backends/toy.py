"""The toy world's annotator as a backend: the default of the toy preset."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.backends import Backend, Preprocess, require_file
from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.stage0.store import file_sha256
from pipeline.toy.annotator import load_annotator


class ToyBackend(Backend):
    name = "toy"
    weights_kind = "toy annotator weights"
    score_kind = "logits"
    preprocess = Preprocess()  # float RGB in [0, 1] at full size; the net normalises inside

    def __init__(self, weights: Path, outputs: tuple[str, ...], device: torch.device, config: Config):
        model, trained = load_annotator(require_file(weights, "toy annotator weights"))
        if trained != tuple(outputs):
            raise UserError(f"{weights}: the toy annotator knows classes {list(trained)}, expected outputs "
                            f"{list(outputs)} (foundation.outputs, else the data set's classes)")
        self.model = model.to(device)

    @classmethod
    def fingerprint(cls, weights: Path, config: Config) -> tuple[str, str | None]:
        return f"toy-annotator:{Path(weights).name}", file_sha256(require_file(weights, cls.weights_kind))

    @torch.no_grad()
    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model(batch)
