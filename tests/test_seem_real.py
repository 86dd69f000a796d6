"""The SEEM backend against the real SEEM code (`make test-seem SEEM_SRC=... D2_SRC=...`).

SEEM is built from its own config with the layer counts shrunk and random weights, a CLIP-format tokenizer
made here and a checkpoint saved by the test; `conformalsam logits` runs through the backend, and the
stored scores are compared with a computation from SEEM's own head outputs and with SEEM's `evaluate`.
Skipped unless SEEM_SRC names a SEEM checkout (branch v1.0 or package) and SEEM's dependencies import.

Test-only patches: those of tests/seem_cpu.py on a machine without CUDA, and `Tensor.cuda` as the identity
while SEEM's own vocabulary call runs for comparison.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read when huggingface_hub is imported: no network waits
SEEM_SRC = os.environ.get("SEEM_SRC")
if not SEEM_SRC or not Path(SEEM_SRC).is_dir():
    pytest.skip("SEEM_SRC is not set to a SEEM checkout (make test-seem SEEM_SRC=... D2_SRC=...)",
                allow_module_level=True)
CODE = Path(SEEM_SRC).resolve()
PACKAGE = (CODE / "seem" / "modeling").is_dir()
ROOT = CODE / "seem" if PACKAGE else CODE

import seem_cpu  # noqa: E402

seem_cpu.declare_torchvision_ops()
pytest.importorskip("detectron2", reason="SEEM's detectron2 fork is not installed (make test-seem D2_SRC=...)")

import fake_seem  # noqa: E402
from cli import app  # noqa: E402
from conftest import make_config, write_gray_png  # noqa: E402
from pipeline.backends import build_backend  # noqa: E402
from pipeline.backends.seem import import_seem  # noqa: E402
from pipeline.data.classmap import NO_OBJECT  # noqa: E402
from pipeline.data.datasets import read_image  # noqa: E402
from pipeline.errors import UserError  # noqa: E402
from pipeline.stage0.store import LogitsStore  # noqa: E402

CLASSES = ("background", "aeroplane", "diningtable", "person", "pottedplant")
SHRINK = {("BACKBONE", "FOCAL", "DEPTHS"): [1, 1, 1, 1], ("TEXT", "LAYERS"): 1, ("DECODER", "DEC_LAYERS"): 3,
          ("ENCODER", "TRANSFORMER_ENC_LAYERS"): 1}


@pytest.fixture(scope="module")
def seem():
    with pytest.MonkeyPatch.context() as patch:
        seem_cpu.redirect_cuda_build(patch)
        yield import_seem(CODE)


def options(seem, tokenizer: Path, embed_dim: int | None = None, heads_off: bool = False) -> dict:
    """SEEM's focal-T v1 options with fewer layers; ``heads_off``: panoptic and instance off at build."""
    opt = seem.load_opt([str(ROOT / "configs" / "seem" / "focalt_unicl_lang_v1.yaml")])
    for path, value in SHRINK.items():
        node = opt["MODEL"]
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    if embed_dim:
        opt["MODEL"]["BACKBONE"]["FOCAL"]["EMBED_DIM"] = embed_dim
    opt["MODEL"]["TEXT"]["PRETRAINED_TOKENIZER"] = str(tokenizer)
    if heads_off:
        opt["MODEL"]["DECODER"]["TEST"].update({"PANOPTIC_ON": False, "INSTANCE_ON": False})
    return opt


def checkpoint(seem, folder: Path, stem="seem_tiny", embed_dim=None, config_dim=None, heads_off=False) -> Path:
    """A random-weight SEEM saved as a checkpoint, its (shrunk) config beside it as <stem>.yaml."""
    import yaml

    tokenizer = fake_seem.write_clip_tokenizer(folder / "tokenizer")
    torch.manual_seed(0)
    model = seem.build_model(options(seem, tokenizer, embed_dim))
    path = folder / f"{stem}.pt"
    torch.save(model.state_dict(), path)
    beside = options(seem, tokenizer, config_dim, heads_off)
    del beside["MODEL"]["TEXT"]["PRETRAINED_TOKENIZER"]  # the adapter sets it from foundation.tokenizer
    path.with_suffix(".yaml").write_text(yaml.safe_dump(beside))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory, seem):
    root = tmp_path_factory.mktemp("seem-real")
    rng = np.random.default_rng(0)
    lines = []
    for i, size in enumerate([(96, 128), (96, 128), (130, 90)]):  # two sizes: two batches, padding differs
        smooth = rng.integers(0, 256, (size[0] // 8 + 1, size[1] // 8 + 1, 3)).astype(np.uint8)
        path = root / "images" / f"im{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(smooth).resize(size[::-1], Image.BILINEAR).save(path)  # smooth, like a photo
        write_gray_png(root / "masks" / f"im{i}.png", rng.integers(0, len(CLASSES), size))
        lines.append(f"images/im{i}.png masks/im{i}.png")
    (root / "labeled.txt").write_text("\n".join(lines) + "\n")
    weights = checkpoint(seem, root)
    config = replace(make_config(root, "folder", root / "labeled.txt", root / "labeled.txt", classes=CLASSES),
                     backend="seem", weights=weights, code=CODE, tokenizer=root / "tokenizer")
    return config


def write_toml(config, path: Path, **extra) -> Path:
    lines = ["[data]", 'format = "folder"', f'root = "{config.root}"', f'labeled = "{config.labeled}"',
             f'unlabeled = "{config.unlabeled}"', f"classes = {json.dumps(list(CLASSES))}", "", "[foundation]",
             'backend = "seem"', f'weights = "{config.weights}"', f'code = "{config.code}"',
             f'tokenizer = "{config.tokenizer}"', *[f'{k} = "{v}"' for k, v in extra.items()], "", "[work]",
             f'dir = "{path.parent / "work"}"']
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def reference(seem, config, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From SEEM's own head outputs (the model loaded by SEEM's own BaseModel.from_pretrained):
    sum_q softmax(class_q) * sigmoid(mask_q) for every vocabulary entry, at the padded input size,
    cropped and resized as SEEM does; and SEEM's own `evaluate` of the same model."""
    module = importlib.import_module(seem.prefix + "modeling.BaseModel")
    opt = seem.load_opt([str(config.weights.with_suffix(".yaml"))])
    opt["MODEL"]["TEXT"]["PRETRAINED_TOKENIZER"] = str(config.tokenizer)
    opt["device"] = "cpu"
    model = module.BaseModel(opt, seem.build_model(opt)).from_pretrained(str(config.weights)).eval()
    core = model.model
    core.panoptic_on = core.instance_on = False  # what SEEM's own semantic evaluation switches
    entries = [p for p in reference.prompts] + ["background"]
    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)  # SEEM's vocabulary call moves tokens
        core.sem_seg_head.predictor.lang_encoder.get_text_embeddings(entries, is_eval=True)
        h, w = image.shape[-2:]
        size = (math.ceil(h / 4), math.ceil(w / 4))
        images = seem.ImageList.from_tensors([(image - core.pixel_mean) / core.pixel_std], core.size_divisibility)
        out = core.sem_seg_head(core.backbone(images.tensor), target_queries=None)
        masks = F.interpolate(out["pred_masks"], size=images.tensor.shape[-2:], mode="bilinear",
                              align_corners=False)[0, :, :h, :w]
        probs = out["pred_logits"][0].softmax(-1)

        def resize(t):
            return F.interpolate(t[None], size=size, mode="bicubic", align_corners=False, antialias=True)[0]

        if core.sem_seg_postprocess_before_inference:  # the shipped configs: logits resized, then sigmoid
            ours = torch.einsum("qe,qhw->ehw", probs, resize(masks).sigmoid())
        else:
            ours = resize(torch.einsum("qe,qhw->ehw", probs, masks.sigmoid()))
        evaluate = core.evaluate([{"image": image, "height": size[0], "width": size[1]}])[0]["sem_seg"]
    return ours, evaluate


reference.prompts = ["airplane", "dining table", "person", "potted plant"]


@pytest.mark.parametrize(("background", "heads"), [("no-object", "shipped"), ("prompt", "off")])
def test_logits_through_the_real_seem_equal_seems_own_computation(seem, data, tmp_path, background, heads):
    """Both background settings, and both orders of SEEM's post-processing: the shipped configs build with
    panoptic and instance on (logits resized, then the sigmoid); with them off, the other order."""
    from typer.testing import CliRunner

    if heads == "off":
        data = replace(data, weights=checkpoint(seem, tmp_path, stem="seem_heads_off", heads_off=True))
    toml = write_toml(data, tmp_path / "exp.toml", background=background)
    result = CliRunner().invoke(app, ["logits", "--config", str(toml), "--split", "labeled", "--device", "cpu",
                                      "--workers", "0", "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    assert "model tensors loaded" in result.output
    store = LogitsStore(tmp_path / "work" / "logits.zarr")
    assert store.score_kind == "scores" and len(store) == 3
    assert store.attrs["class_map"]["classes"]["background"] == ([NO_OBJECT] if background == "no-object" else ["background"])
    reference.prompts = (["background"] if background == "prompt" else []) + [
        "airplane", "dining table", "person", "potted plant"]
    backend_preprocess = build_backend(replace(data, background=background), CLASSES, torch.device("cpu"))[0]
    assert backend_preprocess.core.sem_seg_postprocess_before_inference is (heads == "shipped")
    for i in range(3):
        image = backend_preprocess.preprocess(read_image(data.root / "images" / f"im{i}.png"))
        ours, evaluate = reference(seem, data, image)
        stored = torch.from_numpy(store.read(f"im{i}"))
        scale = float(ours.abs().max())
        order = [reference.prompts.index(p) for p in ("airplane", "dining table", "person", "potted plant")]
        torch.testing.assert_close(stored[1:], ours[order], atol=2e-3 * scale, rtol=2e-3)  # fp16 store
        torch.testing.assert_close(ours[:-1], evaluate, atol=1e-5 * scale, rtol=1e-4)  # SEEM drops no-object
        if background == "no-object":  # class 0 takes SEEM's trailing no-object entry whole
            torch.testing.assert_close(stored[0], ours[-1], atol=2e-3 * scale, rtol=2e-3)
        else:  # the "background" prompt is the same text as the no-object entry: the two split the mass
            torch.testing.assert_close(stored[0], ours[0], atol=2e-3 * scale, rtol=2e-3)
            torch.testing.assert_close(ours[0], ours[-1], atol=1e-5 * scale, rtol=1e-4)


def test_vocabulary_equals_seems_own_and_lives_on_the_model_device(seem, data):
    backend, mapping = build_backend(data, CLASSES, torch.device("cpu"))
    lang = backend.core.sem_seg_head.predictor.lang_encoder
    ours = lang.default_text_embeddings.clone()
    assert ours.device == backend.core.pixel_mean.device and ours.shape[0] == len(mapping.outputs)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
        lang.get_text_embeddings(list(mapping.outputs[:-1]) + ["background"], is_eval=True)
    torch.testing.assert_close(ours, lang.default_text_embeddings, atol=1e-5, rtol=1e-5)
    assert lang.tokenizer.vocab_size == 49408


def _fails(config, match):
    with pytest.raises(UserError, match=match) as err:
        build_backend(config, CLASSES, torch.device("cpu"))
    assert "\n" not in str(err.value)
    return str(err.value)


def test_planted_faults_on_the_real_code(seem, data, tmp_path):
    if PACKAGE:  # importable as `seem` (here: the checkout on sys.path, as after pip install): used as is
        assert build_backend(replace(data, code=None), CLASSES, torch.device("cpu"))[0].seem.prefix == "seem."
    else:
        _fails(replace(data, code=None), "SEEM not found")
    _fails(replace(data, tokenizer=None), "CLIP tokenizer 'openai/clip-vit-base-patch32' is not in the local Hugging Face"
                                          " cache: set foundation.tokenizer")
    other = checkpoint(seem, tmp_path, stem="seem_other", embed_dim=64, config_dim=96)
    message = _fails(replace(data, weights=other), r"does not fit the SEEM model of seem_other.yaml")
    assert "of another shape" in message
    samvit = tmp_path / "seem_samvitb_v1.pt"
    samvit.write_bytes(b"refused before it is read")
    if not seem.encoders.is_model("transformer_encoder_deform"):
        _fails(replace(data, weights=samvit), "needs the deformable encoder .*MultiScaleDeformableAttention CUDA op")
    from PIL import __version__

    assert int(__version__.split(".")[0]) >= 10 and Image.LINEAR == Image.BILINEAR  # detectron2 imported


@pytest.mark.skipif(PACKAGE, reason="the package layout does not import mpi4py")
def test_mpi4py_missing_is_one_line_on_the_real_code(data, monkeypatch):
    for name in [m for m in sys.modules if m.split(".")[0] in ("modeling", "utils", "mpi4py")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    message = _fails(data, r"importing SEEM failed in \S*utils/distributed.py:\d+: ModuleNotFoundError")
    assert "pip install mpi4py mpich" in message


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (scripts/gpu_seem.sh runs it there)")
def test_logits_on_cuda_store_the_cpu_scores(seem, data, tmp_path):
    """Stage 0 on the GPU (fp16 autocast, as `conformalsam logits` runs there) against the CPU's fp32 run."""
    from typer.testing import CliRunner

    stores = {}
    for device in ("cpu", "cuda"):
        toml = write_toml(data, tmp_path / device / "exp.toml")
        result = CliRunner().invoke(app, ["logits", "--config", str(toml), "--split", "labeled", "--device", device,
                                          "--workers", "0", "--batch-size", "2"])
        assert result.exit_code == 0, result.output
        stores[device] = LogitsStore(tmp_path / device / "work" / "logits.zarr")
    for i in range(3):
        cpu, gpu = (torch.from_numpy(stores[d].read(f"im{i}")).float() for d in ("cpu", "cuda"))
        torch.testing.assert_close(gpu, cpu, atol=3e-2 * float(cpu.abs().max()), rtol=0)  # fp16 arithmetic
