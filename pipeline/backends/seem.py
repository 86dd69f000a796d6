"""SEEM (X-Decoder family) as a backend: text prompts in, SEEM's semantic scores out.

SEEM is imported from the user's checkout (``foundation.code``: branch ``v1.0``, layout ``modeling.*``,
or branch ``package``, layout ``seem.modeling.*``) or from an installed ``seem`` package. What this
adapter does instead of SEEM's own entry points, and why:

* it builds SEEM's options itself: SEEM's ``init_distributed`` imports MPI, runs ``hostname -I`` and picks
  the GPU from OpenMPI variables (on the ``package`` branch it always fails). The model goes to the device
  given, one GPU per torchrun rank;
* it switches off the SAM-ViT backbone's pretraining file (a path on the authors' cluster; the checkpoint
  holds the weights), and the panoptic and instance inference after the build, as SEEM's own semantic
  evaluation does (the build-time flags stay: they decide the order of resize and sigmoid below);
* it loads the checkpoint itself and counts the tensors that fit: a wrong config/checkpoint pair is an
  error, never silent random weights (SEEM loads with ``strict=False`` and only logs);
* it checks the CLIP tokenizer first (offline, transformers 5 returns a 2-token stub) and builds the
  text vocabulary on the model's device (SEEM's own call moves the tokens with ``.cuda()``);
* it computes SEEM's ``sem_seg`` exactly, at the stored resolution, for batches. ``evaluate`` upsamples
  every query's mask logits to the padded input; with the shipped configs (panoptic or instance on at
  build: ``sem_seg_postprocess_before_inference``) it crops and resizes (bicubic, antialiased) each
  query's logits to the output size, applies the sigmoid and sums ``softmax(class)[k] * mask`` over
  queries there; otherwise it sums at full resolution and then crops and resizes the (K, H, W) result.
  Crop and resize are linear, so the second order equals resizing each query's sigmoid mask first: both
  are computed here per chunk of queries at the output size, following the model's own flag. SEEM's
  trailing no-object entry is kept as the last output, for the data set's background class.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import math
import traceback
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from pipeline.backends import Backend, Preprocess, read_state_dict, require_file
from pipeline.factory import on_path
from pipeline.torchio import state_fit
from pipeline.config import Config
from pipeline.errors import UserError, describe

STRIDE = 4  # SEEM's masks are at 1/4 of the padded input
SHORT_SIDE = 512  # SEEM's demo resolution
NO_OBJECT_TEXT = "background"  # SEEM's trailing vocabulary entry, as in its own evaluation code
CLIP_VOCAB = 49408
MIN_LOADED = 0.99  # share of the model's parameter values a checkpoint must fill
QUERY_CHUNK = 32  # queries upsampled at once (bounds memory at full resolution)
# checkpoint stem -> its model config in the SEEM repository
CONFIGS = {"seem_focall_v1": "focall_unicl_lang_v1.yaml", "seem_focalt_v1": "focalt_unicl_lang_v1.yaml",
           "seem_focall_v0": "focall_unicl_lang_v0.yaml", "seem_focalt_v0": "focalt_unicl_lang_v0.yaml",
           "seem_samvitb_v1": "samvitb_unicl_lang_v1.yaml", "seem_samvitl_v1": "samvitl_unicl_lang_v1.yaml"}
# import name -> pip name, for the packages SEEM imports whose names differ
PIP_NAMES = {"cv2": "opencv-python-headless", "yaml": "pyyaml", "PIL": "pillow", "skimage": "scikit-image",
             "sklearn": "scikit-learn", "mpi4py": "mpi4py mpich"}
DOCS = "docs/annotators.md 'SEEM'"  # where the messages send the user
D2_TESTED = "42121d7"  # the detectron2-xyz commit make seem-setup pins
DOWNLOAD = ("hf download openai/clip-vit-base-patch32 vocab.json merges.txt tokenizer_config.json "
            "special_tokens_map.json --local-dir data/weights/clip-vit-base-patch32")


def import_seem(code: Path | None) -> SimpleNamespace:
    """SEEM's entry points from the checkout at ``code`` (either layout), else an installed ``seem``."""
    prefix, root = _locate(code)
    _alias_removed_pillow_names()
    try:
        with _quiet(), on_path(code):
            modeling = importlib.import_module(prefix + "modeling")
            return SimpleNamespace(
                prefix=prefix, root=root,
                build_model=modeling.build_model,
                load_opt=importlib.import_module(prefix + "utils.arguments").load_opt_from_config_files,
                templates=importlib.import_module(prefix + "utils.prompt_engineering").get_prompt_templates,
                postprocess=importlib.import_module(prefix + "modeling.modules").sem_seg_postprocess,
                encoders=importlib.import_module(prefix + "modeling.vision.encoder.build"),
                ImageList=importlib.import_module("detectron2.structures").ImageList,
            )
    except Exception as exc:  # SEEM's import chain raises anything from ImportError to RuntimeError
        raise UserError(f"backend 'seem': importing SEEM failed{_where(exc)}: {describe(exc)}; "
                        f"{_import_hint(exc)}") from None


def _locate(code: Path | None) -> tuple[str, Path]:
    """(module prefix, package root) of the SEEM to import: the checkout at ``code``, else an installed seem."""
    if code is None:
        spec = importlib.util.find_spec("seem")
        if spec is None or not spec.submodule_search_locations:
            raise UserError("backend 'seem': SEEM not found; set foundation.code to your SEEM checkout (branch v1.0 "
                            f"or package), see {DOCS}")
        return "seem.", Path(spec.submodule_search_locations[0])
    code = Path(code)
    if not code.is_dir():
        raise UserError(f"foundation.code {code}: no such folder; `make seem-setup` fetches the tested SEEM there "
                        f"(third_party/SEEM-v1.0), or give the folder of your SEEM clone ({DOCS})")
    if (code / "modeling" / "__init__.py").is_file():
        prefix, root = "", code  # v1.0: modeling/, utils/ at the top
    elif (code / "seem" / "modeling" / "__init__.py").is_file():
        prefix, root = "seem.", code / "seem"  # package branch
    else:
        raise UserError(f"foundation.code {code}: not a SEEM checkout (no modeling/ or seem/modeling/ in it); "
                        "give the folder of a SEEM clone at branch v1.0 or package")
    return prefix, root


def _alias_removed_pillow_names() -> None:
    """detectron2-xyz uses Image.LINEAR as a default argument; Pillow 10 removed it and two others."""
    from PIL import Image

    for old, new in (("LINEAR", "BILINEAR"), ("CUBIC", "BICUBIC"), ("ANTIALIAS", "LANCZOS")):
        if not hasattr(Image, old):
            setattr(Image, old, getattr(Image, new))


@contextlib.contextmanager
def _quiet():
    """SEEM prints and warns while importing and building (timm deprecations, optional encoders)."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _where(exc: BaseException) -> str:
    """The innermost frame of the failure outside torch itself (torch's frames only say how it raised)."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    frame = next((f for f in reversed(frames) if "/torch/" not in f.filename), frames[-1])
    parts = Path(frame.filename).parts
    short = "/".join(parts[-3:]) if len(parts) > 3 else frame.filename
    return f" in {short}:{frame.lineno}"


def _package(exc: BaseException) -> str:
    """The top-level package of the innermost frame outside torch (where the failing code lives)."""
    tb, name = exc.__traceback__, "SEEM"
    while tb is not None:
        module = tb.tb_frame.f_globals.get("__name__", "")
        if module and module.split(".")[0] not in ("torch", "importlib", "pipeline"):
            name = module.split(".")[0]
        tb = tb.tb_next
    return name


def _import_hint(exc: BaseException) -> str:
    text, where = str(exc), _where(exc)
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        name = exc.name.split(".")[0]
        if name == "mpi4py":
            return ("SEEM's v1.0 layout imports mpi4py when loaded (utils/distributed.py), though this tool never "
                    "starts MPI: pip install mpi4py mpich")
        if name == "detectron2":
            return f"SEEM needs its detectron2 fork: make seem-setup D2_SRC=<checkout or git URL> ({DOCS})"
        if name == "MultiScaleDeformableAttention":
            return "SEEM's deformable encoder needs its compiled CUDA op"
        return (f"a package SEEM imports is missing: pip install {PIP_NAMES.get(name, name)}, or make seem-setup for "
                f"all of them ({DOCS})")
    if isinstance(exc, AttributeError) and ("PIL" in text or "Image" in text):
        from PIL import __version__ as pillow

        package = _package(exc)
        return (f"{package} uses a name that Pillow {pillow} no longer has, and this tool needs Pillow >= 10: use a "
                f"{package} that does not use it (make seem-setup builds the tested detectron2-xyz {D2_TESTED}, "
                "whose one such name, Image.LINEAR, is aliased here)")
    if "torchvision" in where or "torchvision" in text:
        from importlib.metadata import PackageNotFoundError, version

        try:
            vision = f"torchvision {version('torchvision')}"
        except PackageNotFoundError:
            vision = "torchvision"
        return (f"{vision} cannot load its ops beside torch {torch.__version__} (another release, or a CUDA build "
                "beside a CPU one): install the torchvision build made for this torch")
    return f"see {DOCS} for the tested install"


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


def model_options(seem: SimpleNamespace, config_path: Path, tokenizer: Path | None, device: torch.device) -> dict:
    """SEEM's options for semantic inference, built without its MPI ``init_distributed``."""
    try:
        opt = seem.load_opt([str(config_path)])
        model = opt["MODEL"]
        model["DECODER"]["TEST"]["SEMANTIC_ON"] = True
        model["BACKBONE"]["LOAD_PRETRAINED"] = False
        text = model["TEXT"]
        text.get("TOKENIZER")
    except Exception as exc:  # YAML errors, SEEM's own asserts, missing or misshapen sections
        raise UserError(f"{config_path}: not a SEEM model config ({describe(exc)})") from None
    if tokenizer is not None:
        text["PRETRAINED_TOKENIZER"] = str(tokenizer)
    opt["device"] = device
    return opt


def check_tokenizer_folder(tokenizer: Path | None) -> None:
    if tokenizer is None:
        return
    missing = [name for name in ("vocab.json", "merges.txt") if not (Path(tokenizer) / name).is_file()]
    if missing:
        what = "no such folder" if not Path(tokenizer).is_dir() else f"no {' or '.join(missing)} in it"
        raise UserError(f"foundation.tokenizer {tokenizer}: {what}; give a CLIP tokenizer folder ({DOWNLOAD})")


def resolve_tokenizer(text: dict) -> None:
    """Point SEEM's CLIP tokenizer option at a local folder, never at the hub: the one configured, else the
    local Hugging Face cache's copy of SEEM's default (an offline machine would otherwise wait minutes for
    the hub before failing). Refuse one that is not CLIP's (49,408 tokens): SEEM would build a model that
    the checkpoint does not fit."""
    if text.get("TOKENIZER") not in ("clip", "clip-fast"):
        return
    name = text.get("PRETRAINED_TOKENIZER", "openai/clip-vit-base-patch32")
    if not Path(name).is_dir():
        try:
            from huggingface_hub import snapshot_download

            name = snapshot_download(name, local_files_only=True)
        except Exception:  # not cached (or no huggingface_hub): the same advice
            raise UserError(f"SEEM's CLIP tokenizer '{name}' is not in the local Hugging Face cache: set "
                            f"foundation.tokenizer to a local CLIP tokenizer folder ({DOWNLOAD})") from None
        text["PRETRAINED_TOKENIZER"] = name
    try:
        from transformers import CLIPTokenizer

        with _quiet():
            tokenizer = CLIPTokenizer.from_pretrained(name)
    except Exception as exc:  # a damaged folder: OSError, TypeError or ValueError by transformers release
        raise UserError(f"SEEM's CLIP tokenizer '{name}' cannot be loaded ({describe(exc)}); {DOWNLOAD}") from None
    if tokenizer.vocab_size != CLIP_VOCAB:
        raise UserError(f"SEEM's CLIP tokenizer '{name}' has {tokenizer.vocab_size} tokens, CLIP's has {CLIP_VOCAB:,}: "
                        f"give the CLIP tokenizer SEEM was trained with ({DOWNLOAD})")


def check_encoder(seem: SimpleNamespace, opt: dict, weights: Path, config_path: Path) -> None:
    """SEEM registers its deformable encoder (SAM-ViT models) only when the CUDA op is compiled."""
    name = (opt["MODEL"].get("ENCODER") or {}).get("NAME")
    if name is None or seem.encoders.is_model(name):
        return
    if name == "transformer_encoder_deform":
        try:
            with _quiet():
                importlib.import_module(seem.prefix + "modeling.vision.encoder.ops.functions.ms_deform_attn_func")
        except Exception as exc:
            ops = seem.root / "modeling" / "vision" / "encoder" / "ops"
            raise UserError(f"{weights}: this SEEM model ({config_path.name}) needs the deformable encoder "
                            f"'{name}', which SEEM registers only when its MultiScaleDeformableAttention CUDA op "
                            f"is compiled ({describe(exc).split('. ')[0]}); compile it (cd {ops} && sh make.sh, needs "
                            "CUDA and nvcc) or use seem_focall_v1.pt / seem_focalt_v1.pt, which need no compiled "
                            "op") from None
    raise UserError(f"{config_path}: encoder '{name}' is not registered in this SEEM")


def build(seem: SimpleNamespace, opt: dict, config_path: Path):
    try:
        with _quiet():
            return seem.build_model(opt)
    except Exception as exc:
        if not torch.cuda.is_available() and any(s in str(exc) for s in ("CUDA", "NVIDIA", "cuda")):
            raise UserError("SEEM's model builder needs CUDA (seem_model_v1.py calls torch.cuda.current_device()) "
                            f"and this torch has none ({describe(exc)}): run stage 0 on a GPU machine, where any "
                            "--device works, cpu included") from None
        raise UserError(f"{config_path}: building SEEM failed{_where(exc)}: {describe(exc)}") from None


def load_checkpoint(model: torch.nn.Module, weights: Path, config_path: Path) -> tuple[str, list[str]]:
    """Load a SEEM checkpoint (a state dict) and refuse one that does not fit the model.

    Refused: a tensor of another shape (another SEEM size), or under 99% of the model's parameter values
    found. Returns a note (tensors loaded) and warnings (parameters left at their initial values)."""
    try:
        state = read_state_dict(weights)
    except UserError as exc:
        raise UserError(f"{exc} (not a SEEM checkpoint)") from None
    own = model.state_dict()
    for prefix in ("model.", "module."):  # saved from a wrapper (SEEM's BaseModel, DDP)
        if not own.keys() & state.keys() and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    fit = state_fit(own, state)
    fits, other_shape = fit.fits, fit.other_shape
    params = dict(model.named_parameters())
    missing = [k for k in params if k not in fits]
    found = 1 - sum(params[k].numel() for k in missing) / max(1, sum(p.numel() for p in params.values()))
    if other_shape or found < MIN_LOADED:
        raise UserError(f"{weights}: does not fit the SEEM model of {config_path.name}: {len(fits):,} of "
                        f"{len(own):,} model tensors found ({100 * found:.1f}% of the parameter values), "
                        f"{len(other_shape):,} of another shape ({fit.example(state, own)}); give this "
                        f"checkpoint's own config (beside it as {weights.stem}.yaml)")
    model.load_state_dict(fits, strict=False)
    warnings_ = [f"SEEM: {len(missing)} of the model's parameters are not in {weights.name} and keep their "
                 "initial values: " + ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")] if missing else []
    return f"SEEM: {len(fits):,} of {len(own):,} model tensors loaded from {weights.name}", warnings_


class SeemBackend(Backend):
    name = "seem"
    weights_kind = "SEEM checkpoint"
    score_kind = "scores"
    autocast = True
    prompted = True
    no_object = True
    preprocess = Preprocess(short_side=SHORT_SIDE, uint8=True)

    def __init__(self, weights: Path, outputs: tuple[str, ...], device: torch.device, config: Config):
        weights = require_file(weights, self.weights_kind)
        check_tokenizer_folder(config.tokenizer)
        seem = import_seem(config.code)
        config_path = find_config(weights, seem.root)
        opt = model_options(seem, config_path, config.tokenizer, device)
        resolve_tokenizer(opt["MODEL"]["TEXT"])
        check_encoder(seem, opt, weights, config_path)
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)  # SEEM creates a tensor on the current device while building
        model = build(seem, opt, config_path)
        note, self.warnings = load_checkpoint(model, weights, config_path)
        model.panoptic_on = model.instance_on = False  # as SEEM's semantic evaluation switches them
        self.core = model.eval().to(device)
        self.seem, self.device, self.outputs = seem, device, outputs
        self._vocabulary(list(outputs) + [NO_OBJECT_TEXT])
        self.notes = (note,)

    @torch.no_grad()
    def _vocabulary(self, entries: list[str]) -> None:
        """SEEM's eval-time text embeddings (each entry through its prompt templates, averaged,
        normalised), computed here on the model's device; the last entry is SEEM's no-object."""
        lang = self.core.sem_seg_head.predictor.lang_encoder
        templates = self.seem.templates()
        embeddings = []
        for entry in entries:
            name = entry.replace("-other", "").replace("-merged", "").replace("-stuff", "")  # as SEEM does
            tokens = lang.tokenizer([t.format(name) for t in templates], padding="max_length", truncation=True,
                                    max_length=lang.max_token_num, return_tensors="pt")
            text = (tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device))
            mean = lang.forward_language(text, norm=True).float().mean(0)
            embeddings.append(mean / mean.norm())
        lang.default_text_embeddings = torch.stack(embeddings)
        self.core.sem_seg_head.num_classes = len(entries) - 1

    @torch.no_grad()
    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 -> (B, prompts + 1, ceil(H/4), ceil(W/4)): SEEM's sem_seg per vocabulary entry,
        the no-object entry last."""
        core = self.core
        images = self.seem.ImageList.from_tensors([(x - core.pixel_mean) / core.pixel_std for x in batch],
                                                  core.size_divisibility)
        out = core.sem_seg_head(core.backbone(images.tensor), target_queries=None)
        height, width = (math.ceil(s / STRIDE) for s in batch.shape[-2:])
        logits_first = core.sem_seg_postprocess_before_inference  # resize the logits, then the sigmoid
        with torch.autocast(batch.device.type, enabled=False):
            probs = out["pred_logits"].float().softmax(-1)  # (B, Q, entries)
            scores = []
            for b, size in enumerate(images.image_sizes):
                total = 0
                for q in range(0, probs.shape[1], QUERY_CHUNK):
                    masks = F.interpolate(out["pred_masks"][b : b + 1, q : q + QUERY_CHUNK].float(),
                                          size=images.tensor.shape[-2:], mode="bilinear", align_corners=False)[0]
                    if logits_first:
                        masks = self.seem.postprocess(masks, size, height, width).sigmoid()
                    else:
                        masks = self.seem.postprocess(masks.sigmoid(), size, height, width)
                    total = total + torch.einsum("qe,qhw->ehw", probs[b, q : q + QUERY_CHUNK], masks)
                scores.append(total)
        return torch.stack(scores)
