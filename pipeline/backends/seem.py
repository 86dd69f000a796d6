"""SEEM (X-Decoder family) as a backend: text prompts in, SEEM's semantic scores out.

Works with both layouts of the SEEM repository: the `package` branch (``seem.modeling`` ...) and the
v1.0 layout (``modeling``, ``utils`` on ``sys.path``). What this adapter gets right:

* the vocabulary is the class names (as readable prompts) + a trailing "background": SEEM treats the
  LAST entry as "no object" and drops it, so without it the last real class would vanish;
* the panoptic and instance heads are switched off before the model is built (they force
  full-resolution masks for every query: slow and memory hungry);
* ``evaluate`` is called on whole batches, under fp16 autocast on CUDA, and asked for masks at 1/4 of
  the input size (SEEM's native mask resolution), never upsampled to full size;
* its ``sem_seg`` is sum_q softmax(class_q)[k] * sigmoid(mask_q): non-negative and unnormalised, so
  the store records score kind ``scores`` (normalised over classes when read as probabilities).
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path
from types import SimpleNamespace

import torch

from pipeline.backends import Backend, Preprocess, prompts, require_file
from pipeline.errors import UserError
from pipeline.store import file_sha256

STRIDE = 4
SHORT_SIDE = 512  # SEEM's demo resolution
# checkpoint stem -> its model config in the SEEM repository
CONFIGS = {"seem_focall_v1": "focall_unicl_lang_v1.yaml", "seem_focalt_v1": "focalt_unicl_lang_v1.yaml",
           "seem_focall_v0": "focall_unicl_lang_v0.yaml", "seem_focalt_v0": "focalt_unicl_lang_v0.yaml",
           "seem_samvitb_v1": "samvitb_unicl_lang_v1.yaml", "seem_samvitl_v1": "samvitl_unicl_lang_v1.yaml"}
INSTALL = ("install SEEM from its git repository (see README: 'SEEM'), e.g. pip install "
           "'git+https://github.com/UX-Decoder/Segment-Everything-Everywhere-All-At-Once.git@package'")


def import_seem() -> SimpleNamespace:
    """SEEM's entry points from whichever layout is installed."""
    for prefix in ("seem.", ""):
        try:
            return SimpleNamespace(
                BaseModel=importlib.import_module(prefix + "modeling.BaseModel").BaseModel,
                build_model=importlib.import_module(prefix + "modeling").build_model,
                load_opt=importlib.import_module(prefix + "utils.arguments").load_opt_from_config_files,
                init_distributed=importlib.import_module(prefix + "utils.distributed").init_distributed,
                root=Path(importlib.import_module(prefix + "modeling").__file__).resolve().parent.parent,
            )
        except ImportError:
            continue
    raise UserError(f"backend 'seem': SEEM is not installed; {INSTALL}")


def find_config(weights: Path, seem_root: Path) -> Path:
    """The model config of a checkpoint: beside it (<stem>.yaml), else SEEM's configs/seem/<name>."""
    candidates = [weights.with_suffix(".yaml")]
    if weights.stem in CONFIGS:
        candidates += [root / "configs" / "seem" / CONFIGS[weights.stem] for root in (seem_root, seem_root.parent)]
    for path in candidates:
        if path.is_file():
            return path
    raise UserError(f"{weights}: no SEEM model config found (looked for {', '.join(map(str, candidates))}); "
                    "put the matching configs/seem/*.yaml beside the checkpoint as <checkpoint-stem>.yaml")


class SeemBackend(Backend):
    name = "seem"
    score_kind = "scores"
    autocast = True
    preprocess = Preprocess(short_side=SHORT_SIDE, uint8=True)

    def __init__(self, weights: Path, classes: tuple[str, ...], device: torch.device):
        seem = import_seem()
        weights = require_file(weights, "SEEM checkpoint")
        opt = seem.init_distributed(seem.load_opt([str(find_config(weights, seem.root))]))
        opt["device"] = device.type
        test = opt["MODEL"]["DECODER"]["TEST"]
        test.update({"SEMANTIC_ON": True, "PANOPTIC_ON": False, "INSTANCE_ON": False})
        model = seem.BaseModel(opt, seem.build_model(opt)).from_pretrained(str(weights)).eval().to(device)
        vocabulary = prompts(classes) + ["background"]
        with torch.no_grad():
            model.model.sem_seg_head.predictor.lang_encoder.get_text_embeddings(vocabulary, is_eval=True)
        model.model.sem_seg_head.num_classes = len(classes)
        self.model, self.num_classes, self.weights = model, len(classes), weights
        self.model_id = f"seem:{weights.name}"
        self.weights_sha256 = file_sha256(weights)

    @torch.no_grad()
    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        height, width = (math.ceil(s / STRIDE) for s in batch.shape[-2:])
        outputs = self.model.model.evaluate([{"image": img, "height": height, "width": width} for img in batch])
        scores = torch.stack([out["sem_seg"] for out in outputs])
        if scores.shape[1] != self.num_classes:
            raise UserError(f"{self.weights}: SEEM returned {scores.shape[1]} classes, expected {self.num_classes}")
        return scores
