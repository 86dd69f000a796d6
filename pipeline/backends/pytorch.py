"""Any PyTorch model as annotator: a factory function builds it, a state dict fills it.

``foundation.factory`` names the function, ``module:function`` (the user's code or an installed package)
or ``path/to/file.py:function``; it is called without arguments while ``foundation.code`` (e.g. the
user's checkout of the model's repository) is first on sys.path. The model maps float RGB (B, 3, H, W),
resized and normalised as ``foundation.resize`` / ``mean`` / ``std`` declare, to (B, C, h, w) logits, one
channel per ``foundation.outputs`` entry; ``foundation.weights`` is loaded into it strictly.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import torch

from pipeline.backends import Backend, Preprocess, checked_output, on_path, probe_outputs, read_state_dict, state_fit
from pipeline.store import file_sha256
from pipeline.config import Config
from pipeline.errors import UserError, describe


def load_factory(spec: str | None, code: Path | None):
    """The factory function named by ``module:function`` or ``file.py:function``."""
    if not spec or ":" not in spec:
        raise UserError(f"foundation.factory {spec!r}: give 'module:function' or 'path/to/file.py:function' (the "
                        "function returns the model)")
    if code is not None and not Path(code).is_dir():
        raise UserError(f"foundation.code {code}: no such folder (the checkout the factory imports from)")
    where, name = spec.rsplit(":", 1)
    try:
        with on_path(code):
            if where.endswith(".py"):
                if not Path(where).is_file():
                    raise UserError(f"foundation.factory: {where} not found")
                module_spec = importlib.util.spec_from_file_location(Path(where).stem, where)
                module = importlib.util.module_from_spec(module_spec)
                module_spec.loader.exec_module(module)
            else:
                module = importlib.import_module(where)
    except UserError:
        raise
    except Exception as exc:  # the user's module: any error while importing it
        raise UserError(f"foundation.factory {spec}: importing {where} failed ({describe(exc)})") from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise UserError(f"foundation.factory {spec}: {where} has no function '{name}'")
    return factory


class PyTorchBackend(Backend):
    name = "pytorch"
    weights_kind = "state dict"
    score_kind = "logits"
    autocast = True

    def __init__(self, weights: Path, outputs: tuple[str, ...], device: torch.device, config: Config):
        factory = load_factory(config.factory, config.code)
        try:
            with on_path(config.code):
                model = factory()
        except Exception as exc:
            hint = (f"; is foundation.code ({config.code}) the checkout that provides it?"
                    if isinstance(exc, ModuleNotFoundError) else "")
            raise UserError(f"foundation.factory {config.factory}: calling it failed ({describe(exc)}){hint}") from None
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
