"""CLIPSeg and SAM 3 through transformers (extra `hf`): text prompts in, per-class logits out.

Both load from a local folder (``save_pretrained`` layout, tokenizer files included) or a hub id
already in the local cache. Preprocessing is done here by hand (their image processors need
torchvision). The image is encoded once per batch and its features are reused for every class
prompt; prompts are encoded once at start-up.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.backends import Backend, Preprocess
from pipeline.config import Config
from pipeline.errors import UserError

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _transformers():
    try:
        import transformers
    except ImportError:
        raise UserError("this backend needs transformers: pip install -e '.[hf]'") from None
    return transformers


def _load(cls, weights: Path, device: torch.device):
    try:
        return cls.from_pretrained(str(weights)).eval().to(device)
    except (OSError, ValueError) as exc:
        raise UserError(f"{weights}: cannot load a {cls.__name__} from it ({str(exc).splitlines()[0]}); give a "
                        "folder written by save_pretrained (or a hub id already in the local cache)") from None


def _weights_id(weights: Path) -> str | None:
    """sha256 of the weights file inside a model folder (None for a hub id)."""
    from pipeline.stage0.store import file_sha256

    for name in ("model.safetensors", "pytorch_model.bin"):
        if (Path(weights) / name).is_file():
            return file_sha256(Path(weights) / name)
    return None


class _TextPromptBackend(Backend):
    score_kind = "logits"  # one logit map per prompt; softmax over classes gives probabilities
    autocast = True
    prompted = True
    model_class = ""

    @classmethod
    def fingerprint(cls, weights: Path, config: Config) -> tuple[str, str | None]:
        return f"{cls.name}:{Path(weights).name}", _weights_id(weights)

    def __init__(self, weights: Path, outputs: tuple[str, ...], device: torch.device, config: Config):
        self.transformers = _transformers()
        self.model = _load(getattr(self.transformers, self.model_class), weights, device)
        self.device, self.weights = device, weights
        ids, mask = self._tokenize(weights, list(outputs))
        with torch.no_grad():
            self.text = self._encode_text(ids.to(device), mask.to(device))

    def _tokenize(self, weights: Path, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            tokenizer = self.transformers.AutoTokenizer.from_pretrained(str(weights))
        except (OSError, ValueError) as exc:
            raise UserError(f"{weights}: no tokenizer files ({str(exc).splitlines()[0]}); save the tokenizer "
                            "beside the model with save_pretrained") from None
        tokens = tokenizer(prompts, padding="max_length", truncation=True, max_length=32, return_tensors="pt")
        return tokens["input_ids"], tokens["attention_mask"]


class ClipSegBackend(_TextPromptBackend):
    """CLIPSeg (e.g. CIDAS/clipseg-rd64-refined): (K, 352, 352) logits, an independent sigmoid per prompt."""

    name = "clipseg"
    model_class = "CLIPSegForImageSegmentation"

    def __init__(self, weights: Path, outputs: tuple[str, ...], device: torch.device, config: Config):
        super().__init__(weights, outputs, device, config)
        size = self.model.config.vision_config.image_size
        self.preprocess = Preprocess(fixed=(size, size), mean=IMAGENET[0], std=IMAGENET[1])

    def _encode_text(self, ids, mask) -> torch.Tensor:
        return self.model.clip.get_text_features(input_ids=ids, attention_mask=mask).pooler_output  # (K, P)

    @torch.no_grad()
    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        b, k = batch.shape[0], self.text.shape[0]
        vision = self.model.clip.get_image_features(pixel_values=batch, output_hidden_states=True)
        # the image is encoded once; its activations are repeated for each class prompt
        activations = [vision.hidden_states[i + 1].repeat_interleave(k, 0) for i in self.model.extract_layers]
        logits = self.model.decoder(activations, self.text.repeat(b, 1)).logits
        return logits.reshape(b, k, *logits.shape[-2:])


class Sam3Backend(_TextPromptBackend):
    """SAM 3 (facebook/sam3): one semantic-seg logit map per text prompt, (K, 288, 288) at 1008 input."""

    name = "sam3"
    model_class = "Sam3Model"

    def __init__(self, weights: Path, outputs: tuple[str, ...], device: torch.device, config: Config):
        super().__init__(weights, outputs, device, config)
        size = self.model.config.vision_config.backbone_config.image_size
        size = size if isinstance(size, int) else size[0]
        self.preprocess = Preprocess(fixed=(size, size), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

    def _encode_text(self, ids, mask) -> tuple[torch.Tensor, torch.Tensor]:
        return ids, mask  # SAM 3 takes token ids per call; nothing to precompute

    @torch.no_grad()
    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        ids, mask = self.text
        vision = self.model.get_vision_features(pixel_values=batch)  # once per image, reused per class
        maps = []
        for k in range(ids.shape[0]):
            out = self.model(vision_embeds=vision, input_ids=ids[k : k + 1].expand(batch.shape[0], -1),
                             attention_mask=mask[k : k + 1].expand(batch.shape[0], -1))
            maps.append(out.semantic_seg[:, 0])
        return torch.stack(maps, 1)
