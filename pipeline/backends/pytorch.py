"""Any PyTorch model as annotator: a factory function builds it, a state dict fills it.

``foundation.factory`` names the function, ``module:function`` (the user's code or an installed package)
or ``path/to/file.py:function``; it is called without arguments while ``foundation.code`` (e.g. the
user's checkout of the model's repository) is first on sys.path. The model maps float RGB (B, 3, H, W),
resized and normalised as ``foundation.resize`` / ``mean`` / ``std`` declare, to (B, C, h, w) logits, one
channel per ``foundation.outputs`` entry; ``foundation.weights`` is loaded into it strictly.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.backends import Backend, Preprocess, checked_output, probe_outputs, read_state_dict
from pipeline.stage0.store import file_sha256
from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.factory import call_factory, load_factory
from pipeline.torchio import state_fit


class PyTorchBackend(Backend):
    name = "pytorch"
    weights_kind = "state dict"
    score_kind = "logits"
    autocast = True

    def __init__(self, weights: Path, outputs: tuple[str, ...], device: torch.device, config: Config):
        factory = load_factory(config.factory, config.code, "foundation.factory")
        model = call_factory(factory, config.factory, config.code, "foundation.factory")
        if not isinstance(model, torch.nn.Module):
            raise UserError(f"foundation.factory {config.factory}: returned a {type(model).__name__}, not a "
                            "torch.nn.Module")
        state, own = read_state_dict(weights), model.state_dict()
        fit = state_fit(own, state)
        if fit.other_shape or fit.missing or fit.unexpected:
            raise UserError(f"{weights}: does not fit the model of {config.factory}: {len(fit.fits):,} of its "
                            f"{len(own):,} tensors found, {len(fit.other_shape)} of another shape, "
                            f"{len(fit.unexpected)} unexpected ({fit.example(state, own)})")
        model.load_state_dict(state)
        self.model = model.eval().to(device)
        self.outputs, self.weights, self.factory = outputs, weights, config.factory
        self.preprocess = Preprocess(
            fixed=tuple(config.resize) if isinstance(config.resize, tuple) else None,
            short_side=config.resize if isinstance(config.resize, int) else None,
            mean=config.mean or (0.0, 0.0, 0.0), std=config.std or (1.0, 1.0, 1.0))
        probe_outputs(self, device)

    @classmethod
    def fingerprint(cls, weights: Path, config: Config) -> tuple[str, str | None]:
        """The factory (a file by name and content, wherever the checkout lies) and the preprocessing are part
        of the model: other ones, another store. The code checkout it imports is named, not hashed."""
        model_id, sha = super().fingerprint(weights, config)
        where, name = (config.factory or ":").rsplit(":", 1)
        factory = (f"{Path(where).name}:{name} ({file_sha256(Path(where))[:12]})" if where.endswith(".py")
                   and Path(where).is_file() else config.factory)
        code = f" code={Path(config.code).name}" if config.code is not None else ""
        return f"{model_id} factory={factory}{code} resize={config.resize} mean={config.mean} std={config.std}", sha

    @torch.no_grad()
    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        return checked_output(self.model(batch), batch, self.outputs, f"foundation.factory {self.factory}")
