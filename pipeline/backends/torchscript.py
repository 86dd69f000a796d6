"""Any TorchScript model mapping float32 RGB (B, 3, H, W) in [0, 1] to (B, C, h, w) logits, one channel per
foundation.outputs entry (default: the data set's classes)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from pipeline.backends import Backend, Preprocess, checked_output, probe_outputs, require_file
from pipeline.config import Config
from pipeline.errors import UserError


class TorchScriptBackend(Backend):
    name = "torchscript"
    weights_kind = "TorchScript file"
    score_kind = "logits"
    preprocess = Preprocess()

    def __init__(self, weights: Path, outputs: tuple[str, ...], device: torch.device, config: Config):
        require_file(weights, self.weights_kind)
        try:
            with warnings.catch_warnings():  # TorchScript is deprecated upstream, still what users export
                warnings.simplefilter("ignore", DeprecationWarning)
                self.model = torch.jit.load(str(weights), map_location=device).eval()
        except Exception as exc:  # torch raises RuntimeError / ValueError variants for foreign files
            raise UserError(f"{weights}: not a TorchScript file ({type(exc).__name__}); save one with "
                            "torch.jit.script(model).save(path)") from None
        self.weights, self.outputs = Path(weights), outputs
        probe_outputs(self, device)

    @torch.no_grad()
    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        return checked_output(self.model(batch), batch, self.outputs, str(self.weights))
