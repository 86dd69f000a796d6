"""A small fake of SEEM (and of the detectron2 fork it imports) that behaves like the real code where the
adapter depends on it, so the fast tests catch what `make test-seem` catches on the real code:

* layouts: v1.0 (``modeling``, ``utils`` at the top; ``utils/distributed.py`` imports mpi4py when loaded)
  and ``package`` (``seem.*``; its ``init_distributed`` uses MPI without importing it: NameError);
* ``build_model`` calls ``torch.cuda.current_device()`` (fails on a CPU-only torch), refuses an encoder that
  is not registered (the deformable one needs a compiled CUDA op) and a backbone pretraining path that
  does not exist; it loads the CLIP tokenizer named in the options with transformers, and the token
  embedding has one row per token (a stub tokenizer gives a model the checkpoint does not fit);
* ``get_text_embeddings`` moves tokens with ``.cuda()``; ``BaseModel.from_pretrained`` keeps the keys
  whose shapes match and loads with ``strict=False``;
* ``evaluate``: 0..255 pixels normalised inside, padded to a multiple of 32, masks at 1/4 of the padded
  size upsampled to it; with panoptic or instance on at build (the shipped configs) each query's logits
  are cropped and resized (bicubic, antialiased) to (height, width) before ``sum_q softmax(class_q)[:-1]
  * sigmoid(mask_q)``, otherwise that sum is taken at full resolution and then cropped and resized;
* detectron2's ``data`` package uses ``Image.LINEAR`` as a default argument (removed in Pillow 10).

Configs are JSON (valid YAML). Nothing here is SEEM's code: it is written from the behaviour listed above.
"""

from __future__ import annotations

import json
from pathlib import Path

MODEL = '''
import torch
import torch.nn.functional as F
from torch import nn
from detectron2.data import MetadataCatalog  # noqa: F401  (as the real model imports it)
from detectron2.structures import ImageList
from transformers import CLIPTokenizer

from utils.distributed import is_main_process  # noqa: F401  (as SEEM's text encoder does: loads mpi4py)
from utils.prompt_engineering import get_prompt_templates

from .modules import sem_seg_postprocess
from .vision.encoder import build as encoders

QUERIES = 6


class Lang(nn.Module):
    def __init__(self, tokenizer, width, context):
        super().__init__()
        self.tokenizer, self.max_token_num = tokenizer, context
        self.token_embedding = nn.Embedding(len(tokenizer), width)
        self.lang_proj = nn.Parameter(torch.randn(width, 8) * 0.5)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))

    def forward_language(self, texts, norm=True):
        ids, mask = texts
        x = self.token_embedding(ids) * mask[..., None]
        x = x.cumsum(1)[torch.arange(ids.shape[0]), ids.argmax(-1)] @ self.lang_proj  # at the end token, as CLIP
        return x / (x.norm(dim=-1, keepdim=True) + 1e-7) if norm else x

    def get_text_embeddings(self, class_names, name="default", is_eval=False, prompt=True):
        embeddings = []
        for clss in class_names:
            txts = [t.format(clss) for t in get_prompt_templates()]
            tokens = self.tokenizer(txts, padding="max_length", truncation=True, max_length=self.max_token_num,
                                    return_tensors="pt")
            emb = self.forward_language((tokens["input_ids"].cuda(), tokens["attention_mask"].cuda())).mean(0)
            embeddings.append(emb / emb.norm())
        setattr(self, name + "_text_embeddings", torch.stack(embeddings))

    def compute_similarity(self, v_emb):
        v_emb = v_emb / (v_emb.norm(dim=-1, keepdim=True) + 1e-7)
        return self.logit_scale.exp() * v_emb @ self.default_text_embeddings.t()


class Predictor(nn.Module):
    def __init__(self, lang, dim):
        super().__init__()
        self.lang_encoder = lang
        self.query_embed = nn.Parameter(torch.randn(QUERIES, dim))
        self.class_embed = nn.Linear(dim, 8)
        self.mask_embed = nn.Linear(dim, dim)


class Head(nn.Module):
    def __init__(self, lang, dim):
        super().__init__()
        self.predictor = Predictor(lang, dim)
        self.pixel_decoder = nn.Conv2d(dim, dim, 3, padding=1)
        self.num_classes = 133  # COCO panoptic, as built

    def forward(self, features, target_queries=None):
        feats = self.pixel_decoder(features["res2"])                           # (B, C, Hp/4, Wp/4)
        queries = self.predictor.query_embed[None] + feats.mean((2, 3))[:, None]
        return {"pred_logits": self.predictor.lang_encoder.compute_similarity(self.predictor.class_embed(queries)),
                "pred_masks": torch.einsum("bqc,bchw->bqhw", self.predictor.mask_embed(queries), feats) * 4.0}


class Backbone(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 4, stride=4)

    def forward(self, x):
        return {"res2": torch.tanh(self.stem(x))}


class GeneralizedSEEM(nn.Module):
    def __init__(self, opt):
        super().__init__()
        model = opt["MODEL"]
        test = model["DECODER"]["TEST"]
        self.built_with = dict(test)
        text = model["TEXT"]
        tokenizer = CLIPTokenizer.from_pretrained(text.get("PRETRAINED_TOKENIZER", "openai/clip-vit-base-patch32"))
        dim = model["BACKBONE"]["EMBED_DIM"]
        self.backbone = Backbone(dim)
        self.sem_seg_head = Head(Lang(tokenizer, text["WIDTH"], text["CONTEXT_LENGTH"]), dim)
        self.size_divisibility = 32
        self.register_buffer("pixel_mean", torch.tensor([123.675, 116.28, 103.53]).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor([58.395, 57.12, 57.375]).view(-1, 1, 1), False)
        self.register_buffer("dilation_kernel", torch.ones((1, 1, 3, 3), device=torch.cuda.current_device()))
        self.semantic_on, self.panoptic_on, self.instance_on = (test[k] for k in ("SEMANTIC_ON", "PANOPTIC_ON",
                                                                                   "INSTANCE_ON"))
        self.sem_seg_postprocess_before_inference = (test.get("SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE", False)
                                                     or test["PANOPTIC_ON"] or test["INSTANCE_ON"])
        self.calls = []

    @property
    def device(self):
        return self.pixel_mean.device

    def evaluate(self, batched_inputs):
        self.calls.append(len(batched_inputs))
        images = [x["image"].to(self.device) for x in batched_inputs]
        images = [(x - self.pixel_mean) / self.pixel_std for x in images]
        images = ImageList.from_tensors(images, self.size_divisibility)
        outputs = self.sem_seg_head(self.backbone(images.tensor))
        masks = F.interpolate(outputs["pred_masks"], size=images.tensor.shape[-2:], mode="bilinear",
                              align_corners=False)
        results = []
        for cls, mask, inp, size in zip(outputs["pred_logits"], masks, batched_inputs, images.image_sizes):
            height, width = inp.get("height", size[0]), inp.get("width", size[1])
            if self.sem_seg_postprocess_before_inference:  # the logits are resized, then the sigmoid
                mask = sem_seg_postprocess(mask, size, height, width)
            r = torch.einsum("qc,qhw->chw", F.softmax(cls, dim=-1)[..., :-1], mask.sigmoid())
            if not self.sem_seg_postprocess_before_inference:
                r = sem_seg_postprocess(r, size, height, width)
            results.append({"sem_seg": r})
        return results


def build_model(opt):
    model = opt["MODEL"]
    name = model["ENCODER"]["NAME"]
    if not encoders.is_model(name):
        raise ValueError(f"Unkown model: {name}")
    if model["BACKBONE"].get("LOAD_PRETRAINED"):
        filename = model["BACKBONE"]["PRETRAINED"]
        import os
        assert os.path.isfile(filename), f"=> no checkpoint found at '{filename}'"
    return GeneralizedSEEM(opt)
'''

FILES = {
    "modeling/__init__.py": MODEL,
    "modeling/BaseModel.py": '''
import torch
from torch import nn


class BaseModel(nn.Module):
    def __init__(self, opt, module):
        super().__init__()
        self.opt, self.model = opt, module

    def from_pretrained(self, path):
        state = torch.load(path, map_location=self.opt["device"])
        own = self.model.state_dict()
        state = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        self.model.load_state_dict(state, strict=False)
        return self
''',
    "modeling/modules/__init__.py": '''
import torch.nn.functional as F


def sem_seg_postprocess(result, img_size, output_height, output_width):
    result = result[:, : img_size[0], : img_size[1]].expand(1, -1, -1, -1)
    return F.interpolate(result, size=(output_height, output_width), mode="bicubic", align_corners=False,
                         antialias=True)[0]
''',
    "modeling/vision/__init__.py": "",
    "modeling/vision/encoder/__init__.py": '''
from .build import register_encoder
register_encoder("transformer_encoder_fpn")
try:
    from .transformer_encoder_deform import *  # noqa: F403
except:  # noqa: E722  (as SEEM does)
    print("Deformable Transformer Encoder is not available.")
''',
    "modeling/vision/encoder/build.py": '''
_encoders = set()


def register_encoder(name):
    _encoders.add(name)


def is_model(name):
    return name in _encoders
''',
    "modeling/vision/encoder/transformer_encoder_deform.py": '''
from .ops.functions.ms_deform_attn_func import *  # noqa: F403
from .build import register_encoder
register_encoder("transformer_encoder_deform")
''',
    "modeling/vision/encoder/ops/__init__.py": "",
    "modeling/vision/encoder/ops/functions/__init__.py": "",
    "modeling/vision/encoder/ops/functions/ms_deform_attn_func.py": '''
try:
    import MultiScaleDeformableAttention as MSDA  # noqa: F401
except ModuleNotFoundError:
    raise ModuleNotFoundError("\\n\\nPlease compile MultiScaleDeformableAttention CUDA op with the following "
                              "commands:\\n\\t`sh make.sh`\\n")
''',
    "utils/__init__.py": "",
    "utils/arguments.py": '''
import json


def load_opt_from_config_files(conf_files):
    opt = {}
    for path in conf_files:
        with open(path, encoding="utf-8") as f:
            opt.update(json.load(f))
    return opt
''',
    "utils/prompt_engineering.py": '''
def get_prompt_templates():
    return ["{}.", "a photo of a {}.", "a bad photo of the {}."]
''',
    "utils/distributed.py": '''
import os
import torch
from mpi4py import MPI


def init_distributed(opt):
    opt["world_size"], opt["rank"] = 1, 0
    opt["device"] = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    MPI.COMM_WORLD.bcast(os.uname().nodename, root=0)
    return opt


def is_main_process():
    return int(os.environ.get("OMPI_COMM_WORLD_RANK", "0")) == 0
''',
}

DETECTRON2 = {
    "detectron2/__init__.py": "",
    "detectron2/structures/__init__.py": '''
import torch.nn.functional as F


class ImageList:
    def __init__(self, tensor, image_sizes):
        self.tensor, self.image_sizes = tensor, image_sizes

    @staticmethod
    def from_tensors(tensors, size_divisibility=0):
        sizes = [tuple(t.shape[-2:]) for t in tensors]
        h, w = (max(s[i] for s in sizes) for i in (0, 1))
        if size_divisibility > 1:
            h, w = (-(-v // size_divisibility) * size_divisibility for v in (h, w))
        import torch
        return ImageList(torch.stack([F.pad(t, (0, w - t.shape[-1], 0, h - t.shape[-2])) for t in tensors]), sizes)
''',
    "detectron2/data/__init__.py": '''
from PIL import Image


class _Catalog:
    def get(self, name):
        return {}


MetadataCatalog = _Catalog()


def resize(image, size, interp=Image.LINEAR):  # as detectron2-xyz's ExtentTransform default
    return image.resize(size, interp)
''',
}

MPI4PY = {"mpi4py/__init__.py": "", "mpi4py/MPI.py": '''
class _Comm:
    def bcast(self, value, root=0):  # SEEM's init_distributed would call it; the adapter must not
        raise RuntimeError("MPI used: no MPI job runs here")


COMM_WORLD = _Comm()
'''}

CONFIG = {"MODEL": {"TEXT": {"TOKENIZER": "clip", "WIDTH": 16, "CONTEXT_LENGTH": 12},
                    "BACKBONE": {"NAME": "focal_dw", "EMBED_DIM": 8, "LOAD_PRETRAINED": False, "PRETRAINED": ""},
                    "ENCODER": {"NAME": "transformer_encoder_fpn"},
                    "DECODER": {"TEST": {"SEMANTIC_ON": True, "PANOPTIC_ON": True, "INSTANCE_ON": True}}}}
SAMVIT = {"MODEL": {**CONFIG["MODEL"], "ENCODER": {"NAME": "transformer_encoder_deform"},
                    "BACKBONE": {"NAME": "vit", "EMBED_DIM": 8, "LOAD_PRETRAINED": True,
                                 "PRETRAINED": "/nobackup/sam_vit_b_01ec64.pth"}}}


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def install(root: Path, package: bool, mpi4py: bool = True, detectron2: dict | None = None) -> Path:
    """Write a fake SEEM checkout under ``root`` (the folder foundation.code names), a fake detectron2 and,
    for the v1.0 layout, a stub mpi4py beside it; returns the folder to put on sys.path for those two."""
    base = root / "seem" if package else root
    files = dict(FILES)
    if package:  # the package branch imports its own utils by full name and never imports mpi4py
        files = {k: v.replace("from utils.", "from seem.utils.") for k, v in files.items()}
        files["utils/distributed.py"] = files["utils/distributed.py"].replace("from mpi4py import MPI\n", "")
        write(base, {"__init__.py": "from .modeling import *  # noqa: F403\n"})
    write(base, files)
    for name, config in (("focalt_unicl_lang_v1.yaml", CONFIG), ("samvitb_unicl_lang_v1.yaml", SAMVIT)):
        write(base / "configs" / "seem", {name: json.dumps(config)})
    deps = root.parent / (root.name + "-deps")
    write(deps, {**DETECTRON2, **(detectron2 or {})})
    if mpi4py:
        write(deps, MPI4PY)
    return deps


def write_clip_tokenizer(folder: Path) -> Path:
    """A tokenizer folder in CLIP's format with CLIP's vocabulary size (49,408), made of generated merges:
    what SEEM's text encoder needs to build a checkpoint-compatible token embedding, offline."""
    chars = [chr(c) for c in range(ord("!"), ord("~") + 1)] + [chr(c) for c in range(161, 173)]
    chars += [chr(c) for c in range(174, 256)]
    chars += [chr(256 + i) for i in range(256 - len(chars))]  # the 256 byte symbols of byte-level BPE
    merges = [f"{a} {b}" for a in chars for b in chars][: 49408 - 2 * 256 - 2]
    vocab = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(dict.fromkeys(vocab))}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))
    return folder
