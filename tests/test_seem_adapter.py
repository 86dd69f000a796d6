"""The SEEM adapter against a fake that behaves like the real code (tests/fake_seem.py): both layouts,
the exact scores, the vocabulary, the background setting and every planted install fault as one line.
`make test-seem` runs the same checks against the real SEEM code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

import fake_seem
from conftest import make_config, write_gray_png, write_image
from pipeline import PROJECT_ROOT
from pipeline.backends import build_backend
from pipeline.backends.seem import _alias_removed_pillow_names
from pipeline.data.classmap import NO_OBJECT
from pipeline.data.datasets import read_image
from pipeline.errors import UserError
from pipeline.stage0.logits import run_logits
from pipeline.stage0.store import LogitsStore

CLASSES = ("background", "aeroplane", "diningtable", "person")
ROOTS = ("seem", "modeling", "utils", "detectron2", "mpi4py", "MultiScaleDeformableAttention")


def _forget_imports():
    for name in [m for m in sys.modules if m.split(".")[0] in ROOTS]:
        del sys.modules[name]


@pytest.fixture
def world(tmp_path, monkeypatch):
    """A fake SEEM checkout, its dependencies on sys.path, CUDA redirected to the CPU (as in the real test),
    a CLIP-format tokenizer and a checkpoint saved from the model the config builds."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    _forget_imports()

    def make(package=True, mpi4py=True, detectron2=None, config=fake_seem.CONFIG, stem="seem_focalt_v1"):
        code = tmp_path / ("seem-package" if package else "seem-v1")
        sys.path.insert(0, str(fake_seem.install(code, package, mpi4py, detectron2)))
        tokenizer = fake_seem.write_clip_tokenizer(tmp_path / "tokenizer")
        weights = tmp_path / "weights" / f"{stem}.pt"
        weights.parent.mkdir(exist_ok=True)
        if config is not None:
            (weights.with_suffix(".yaml")).write_text(json.dumps(config))
        return replace(make_config(tmp_path, "folder", tmp_path / "l.txt", tmp_path / "u.txt", classes=CLASSES),
                       backend="seem", weights=weights, code=code, tokenizer=tokenizer)

    yield make
    _forget_imports()


def save_checkpoint(config, seed=0, **model_changes):
    """Build the fake model from the config beside the checkpoint (with changes) and save its weights."""
    sys.path.insert(0, str(config.code))
    _alias_removed_pillow_names()  # as the adapter does before importing SEEM
    opt = json.loads(config.weights.with_suffix(".yaml").read_text())
    opt["MODEL"]["TEXT"]["PRETRAINED_TOKENIZER"] = str(config.tokenizer)
    for key, value in model_changes.items():
        opt["MODEL"]["BACKBONE"][key] = value
    modeling = __import__("seem.modeling" if (config.code / "seem").is_dir() else "modeling", fromlist=["x"])
    torch.manual_seed(seed)
    state = modeling.build_model(opt).state_dict()
    torch.save(state, config.weights)
    _forget_imports()
    return state


def by_hand(core, image, logits_first):
    """SEEM's formula from the head's outputs, every vocabulary entry: the masks upsampled to the padded
    input, then crop + bicubic resize of the logits before the sigmoid, or of the class sums after it."""
    x = (image[None].float() - core.pixel_mean) / core.pixel_std
    h, w = image.shape[-2:]
    pad = (-(-h // 32) * 32, -(-w // 32) * 32)
    x = torch.nn.functional.pad(x, (0, pad[1] - w, 0, pad[0] - h))
    out = core.sem_seg_head(core.backbone(x))
    masks = torch.nn.functional.interpolate(out["pred_masks"], size=pad, mode="bilinear", align_corners=False)[0]

    def resize(t):
        return torch.nn.functional.interpolate(t[None, :, :h, :w], size=(-(-h // 4), -(-w // 4)), mode="bicubic",
                                               align_corners=False, antialias=True)[0]

    probs = out["pred_logits"][0].softmax(-1)
    if logits_first:
        return torch.einsum("qe,qhw->ehw", probs, resize(masks).sigmoid())
    return resize(torch.einsum("qe,qhw->ehw", probs, masks.sigmoid()))


HEADS_OFF = {"MODEL": {**fake_seem.CONFIG["MODEL"], "DECODER": {"TEST": {"SEMANTIC_ON": True, "PANOPTIC_ON": False,
                                                                          "INSTANCE_ON": False}}}}


@pytest.mark.parametrize(("package", "heads"), [(True, "shipped"), (False, "shipped"), (True, "off")],
                         ids=["package-layout", "v1.0-layout", "panoptic-instance-off"])
def test_scores_are_seems_own_and_the_vocabulary_is_built_on_the_device(world, package, heads, monkeypatch):
    config = world(package=package, config=fake_seem.CONFIG if heads == "shipped" else HEADS_OFF)
    saved = save_checkpoint(config)
    backend, mapping = build_backend(config, CLASSES, torch.device("cpu"))
    core = backend.core
    logits_first = heads == "shipped"  # panoptic / instance on at build: SEEM resizes logits, then the sigmoid
    assert core.sem_seg_postprocess_before_inference is logits_first
    assert not core.panoptic_on and not core.instance_on and core.semantic_on  # as SEEM's semantic evaluation
    assert torch.equal(core.state_dict()["backbone.stem.weight"], saved["backbone.stem.weight"])
    assert backend.notes[0].startswith(f"SEEM: {len(saved)} of {len(saved)} model tensors loaded")
    # prompts are readable, background takes SEEM's trailing no-object entry, nothing else is duplicated
    assert mapping.outputs == ("airplane", "dining table", "person", NO_OBJECT)
    assert mapping.groups == ((3,), (0,), (1,), (2,))
    ours = core.sem_seg_head.predictor.lang_encoder.default_text_embeddings.clone()
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)  # SEEM's own call, redirected
    core.sem_seg_head.predictor.lang_encoder.get_text_embeddings(["airplane", "dining table", "person",
                                                                  "background"], is_eval=True)
    torch.testing.assert_close(ours, core.sem_seg_head.predictor.lang_encoder.default_text_embeddings)
    image = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 75, 101), dtype=np.uint8))
    scores = backend.predict(torch.stack([image, image.flip(-1)]))
    assert scores.shape == (2, 4, 19, 26) and (scores > -1e-3).all()
    evaluate = core.evaluate([{"image": image, "height": 19, "width": 26}])[0]["sem_seg"]
    torch.testing.assert_close(scores[0, :3], evaluate, atol=1e-5, rtol=1e-5)  # SEEM drops no-object
    torch.testing.assert_close(scores[0], by_hand(core, image, logits_first), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores[1], by_hand(core, image.flip(-1), logits_first), atol=1e-5, rtol=1e-5)
    other = by_hand(core, image, not logits_first)  # the two orders differ: the test can tell them apart
    assert (scores[0] - other).abs().max() > 1e-3


def _folder_data(config, rng, count=3):
    root = config.root
    lines = []
    for i in range(count):
        write_image(root / "images" / f"i{i}.jpg", rng, size=(70, 90))
        write_gray_png(root / "masks" / f"i{i}.png", rng.integers(0, 4, (70, 90)))
        lines.append(f"images/i{i}.jpg masks/i{i}.png")
    (root / "l.txt").write_text("\n".join(lines) + "\n")
    (root / "u.txt").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("background", ["no-object", "prompt"])
def test_logits_stores_the_class_sums_for_both_background_settings(world, background, tmp_path):
    config = replace(world(), background=background)
    _folder_data(config, np.random.default_rng(1))
    save_checkpoint(config)
    result = run_logits(config, "labeled", workers=0, info=lambda m: None, encoding="float16")  # the sums as given
    store = LogitsStore(result["store"])
    assert store.score_kind == "scores" and store.classes == CLASSES
    backend, mapping = build_backend(config, CLASSES, torch.device("cpu"))
    image = backend.preprocess(read_image(config.root / "images" / "i0.jpg"))
    entries = backend.predict(image[None])[0]
    stored = torch.from_numpy(store.read("i0"))
    if background == "no-object":
        assert store.attrs["class_map"]["classes"]["background"] == [NO_OBJECT]
        torch.testing.assert_close(stored[0], entries[-1], atol=2e-3, rtol=2e-3)  # fp16 store
    else:  # "background" is a prompt like any other, and the same text as SEEM's no-object entry: they split
        assert mapping.outputs[0] == "background" and store.attrs["class_map"]["classes"]["background"] == ["background"]
        torch.testing.assert_close(stored[0], entries[0], atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(entries[0], entries[-1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stored[1:], entries[[mapping.groups[k][0] for k in (1, 2, 3)]], atol=2e-3, rtol=2e-3)


def test_several_prompts_per_class_are_summed(world):
    config = replace(world(), class_map=(("person", ("person", "pedestrian")), ("aeroplane", ())))
    save_checkpoint(config)
    backend, mapping = build_backend(config, CLASSES, torch.device("cpu"))
    assert mapping.outputs == ("dining table", "person", "pedestrian", NO_OBJECT)
    image = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (3, 64, 64), dtype=np.uint8))
    entries = backend.predict(image[None])
    mapped = mapping.apply(entries, backend.score_kind)
    torch.testing.assert_close(mapped[0, 3], entries[0, 1] + entries[0, 2])
    assert torch.equal(mapped[0, 1], torch.zeros_like(mapped[0, 1]))  # aeroplane: no prompt, zero


def _fails(config, match):
    with pytest.raises(UserError, match=match) as err:
        build_backend(config, CLASSES, torch.device("cpu"))
    assert "\n" not in str(err.value)
    return str(err.value)


def test_seem_missing_or_not_a_checkout(world, tmp_path):
    config = world()
    _fails(config, "SEEM checkpoint not found")  # checked first: nothing is imported for a missing file
    config.weights.write_bytes(b"checked later")
    _fails(replace(config, code=None), "SEEM not found; set foundation.code")
    _fails(replace(config, code=tmp_path / "weights"), "not a SEEM checkout")


def test_mpi4py_missing_names_the_real_cause(world, monkeypatch):
    config = world(package=False, mpi4py=False)
    config.weights.write_bytes(b"not read: the import fails first")
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # not installed
    message = _fails(config, "mpi4py")
    assert "utils/distributed.py" in message and "pip install mpi4py mpich" in message
    _forget_imports()
    package = world(package=True, mpi4py=False)  # the package layout does not import it at all
    save_checkpoint(package)
    assert build_backend(package, CLASSES, torch.device("cpu"))[0].core is not None


def test_pillow_removed_names_are_aliased_and_other_breaks_reported(world):
    config = world()  # the fake detectron2 uses Image.LINEAR like detectron2-xyz: aliased, so it imports
    save_checkpoint(config)
    build_backend(config, CLASSES, torch.device("cpu"))
    _forget_imports()
    broken = {"detectron2/data/__init__.py": "from PIL import Image\nMetadataCatalog = Image.NEAREST_EXACT_2\n"}
    message = _fails(world(detectron2=broken), "importing SEEM failed in detectron2/data/__init__.py:2")
    assert "AttributeError" in message and "Pillow" in message
    assert "detectron2 uses a name that Pillow" in message and "a release of it" not in message


def test_a_code_folder_that_does_not_exist_names_seem_setup(world, tmp_path):
    config = world()
    config.weights.write_bytes(b"checked later")
    message = _fails(replace(config, code=tmp_path / "third_party" / "SEEM-v1.0"), "SEEM-v1.0: no such folder")
    assert "make seem-setup" in message


def test_tokenizer_not_cached_stub_or_empty_folder_are_refused(world, tmp_path):
    config = world()
    save_checkpoint(config)
    # no folder configured: only the local cache is looked at (here empty), never the hub
    _fails(replace(config, tokenizer=None), r"CLIP tokenizer 'openai/clip-vit-base-patch32' is not in the local Hugging "
                                            r"Face cache: set foundation.tokenizer .*hf download")
    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "vocab.json").write_text(json.dumps({"<|startoftext|>": 0, "<|endoftext|>": 1}))
    (stub / "merges.txt").write_text("#version: 0.2\n")
    _fails(replace(config, tokenizer=stub), "has 2 tokens, CLIP's has 49,408")
    (tmp_path / "empty").mkdir()
    _fails(replace(config, tokenizer=tmp_path / "empty"), r"foundation.tokenizer .*empty: no vocab.json or merges.txt")
    _fails(replace(config, tokenizer=tmp_path / "absent"), "foundation.tokenizer .*: no such folder")


def test_tokenizer_from_the_local_cache(world, tmp_path, monkeypatch):
    config = world()
    save_checkpoint(config)
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda name, local_files_only: str(config.tokenizer))
    backend, _ = build_backend(replace(config, tokenizer=None), CLASSES, torch.device("cpu"))
    assert backend.core.sem_seg_head.predictor.lang_encoder.tokenizer.vocab_size == 49408


def test_checkpoint_wrapped_or_missing_parameters(world):
    config = world()
    state = save_checkpoint(config)
    torch.save({f"model.{k}": v for k, v in state.items()}, config.weights)  # saved from SEEM's BaseModel
    backend, _ = build_backend(config, CLASSES, torch.device("cpu"))
    assert torch.equal(backend.core.state_dict()["backbone.stem.weight"], state["backbone.stem.weight"])
    assert not backend.warnings
    small = {k: v for k, v in state.items() if k != "sem_seg_head.predictor.lang_encoder.logit_scale"}
    torch.save(small, config.weights)  # one scalar missing: loaded, and said
    backend, _ = build_backend(config, CLASSES, torch.device("cpu"))
    assert "1 of the model's parameters are not in seem_focalt_v1.pt" in backend.warnings[0] and "logit_scale" in backend.warnings[0]
    big = {k: v for k, v in state.items() if not k.startswith("sem_seg_head.predictor.lang_encoder.token")}
    torch.save(big, config.weights)  # the token embedding is most of the model: refused
    _fails(config, r"does not fit .*% of the parameter values.*token_embedding.weight missing")


def test_checkpoint_of_another_size_or_not_a_checkpoint(world):
    config = world()
    save_checkpoint(config, EMBED_DIM=12)  # another SEEM size than the config beside it
    message = _fails(config, r"does not fit the SEEM model of seem_focalt_v1.yaml: \d+ of \d+ model tensors found")
    assert "backbone.stem.weight: (12, 3, 4, 4) in the checkpoint, (8, 3, 4, 4) in the model" in message
    config.weights.write_bytes(b"\x00 not a checkpoint")
    _fails(config, "not a SEEM checkpoint")
    torch.save({"model": {"x": torch.zeros(1)}}, config.weights)
    _fails(config, "not a SEEM checkpoint")


def test_samvit_refused_without_the_cuda_op_and_built_with_it(world, tmp_path):
    config = world(config=None, stem="seem_samvitb_v1")  # its config comes from SEEM's configs/seem
    config.weights.write_bytes(b"refused before it is read")
    message = _fails(config, "needs the deformable encoder 'transformer_encoder_deform'")
    assert "MultiScaleDeformableAttention CUDA op" in message and "make.sh" in message
    _forget_imports()
    op = tmp_path / "op"  # with the op compiled the encoder registers; the cluster pretraining path is off
    op.mkdir()
    (op / "MultiScaleDeformableAttention.py").write_text("")
    sys.path.insert(0, str(op))
    config.weights.with_suffix(".yaml").write_text(json.dumps(fake_seem.SAMVIT))
    with pytest.raises(AssertionError, match="no checkpoint found"):  # what SEEM's own options do
        save_checkpoint(config)
    sam = json.loads(config.weights.with_suffix(".yaml").read_text())
    sam["MODEL"]["BACKBONE"]["LOAD_PRETRAINED"] = False
    config.weights.with_suffix(".yaml").write_text(json.dumps(sam))
    save_checkpoint(config)
    config.weights.with_suffix(".yaml").write_text(json.dumps(fake_seem.SAMVIT))  # the adapter switches it off
    sys.path.insert(0, str(op))
    assert build_backend(config, CLASSES, torch.device("cpu"))[0].notes


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for a torch without CUDA")
def test_cpu_only_torch_is_refused_with_the_reason(world, monkeypatch):
    config = world()
    save_checkpoint(config)
    monkeypatch.undo()  # SEEM's builder meets the real torch.cuda.current_device()
    monkeypatch.setattr(sys, "path", [str(config.code.parent / (config.code.name + "-deps")), *sys.path])
    _fails(config, "SEEM's model builder needs CUDA .*run stage 0 on a GPU machine")


def _toml(config, path):
    path.write_text(f'''[data]
format = "folder"
root = "{config.root}"
labeled = "l.txt"
unlabeled = "u.txt"
classes = {json.dumps(list(CLASSES))}

[foundation]
backend = "seem"
weights = "{config.weights}"
code = "{config.code}"
tokenizer = "{config.tokenizer}"
''')
    return path


def _runner(config, tmp_path, prelude=""):
    """A `conformalsam` entry point for subprocesses: the fake's dependencies on the path, CUDA redirected."""
    deps = config.code.parent / (config.code.name + "-deps")
    runner = tmp_path / "run.py"
    runner.write_text(f"import sys, torch\nsys.path[:0] = [{str(deps)!r}, {str(PROJECT_ROOT)!r}]\n"
                      f"torch.cuda.current_device = lambda: 'cpu'\n{prelude}\nimport cli\ncli.main()\n")
    return runner


def test_cli_reports_a_planted_fault_in_one_line(world, tmp_path):
    config = world(package=False, mpi4py=False)
    config.weights.write_bytes(b"not read: the import fails first")
    _folder_data(config, np.random.default_rng(3), count=1)
    runner = _runner(config, tmp_path, prelude="sys.modules['mpi4py'] = None")
    result = subprocess.run([sys.executable, str(runner), "logits", "--config", str(_toml(config, tmp_path / "e.toml")),
                             "--split", "labeled", "--device", "cpu"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: backend 'seem': importing SEEM failed"), result.stderr
    assert "mpi4py" in lines[0] and "Traceback" not in result.stderr


def test_torchrun_ranks_each_build_seem_without_mpi(world, tmp_path):
    """v1.0 layout with an mpi4py whose every call fails: neither one process nor two torchrun ranks touch MPI,
    and the two ranks together write the store one process writes."""
    config = world(package=False)
    _folder_data(config, np.random.default_rng(4), count=4)
    save_checkpoint(config)
    toml, runner = _toml(config, tmp_path / "e.toml"), _runner(config, tmp_path)
    flags = ["logits", "--config", str(toml), "--split", "labeled", "--device", "cpu", "--batch-size", "1",
             "--workers", "0"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, str(runner), *flags, "--work-dir", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(runner), *flags, "--work-dir", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stdout + two.stderr
    a, b = LogitsStore(tmp_path / "one" / "logits.zarr"), LogitsStore(tmp_path / "two" / "logits.zarr")
    assert a.ids() == b.ids() and len(a) == 4
    for image_id in a.ids():
        np.testing.assert_array_equal(a.read(image_id), b.read(image_id))
