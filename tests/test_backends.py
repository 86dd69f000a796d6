"""Backends: preprocessing, the registry, and the class map that turns model outputs into data set classes."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import backend_config, toy_config
from pipeline.backends import Preprocess, build_backend
from pipeline.data.classmap import NO_OBJECT, build_class_map
from pipeline.data.datasets import Dataset, read_image
from pipeline.errors import UserError
from pipeline.stage0.logits import run_logits
from pipeline.stage0.store import LogitsStore, to_probabilities

CLASSES = ("background", "aeroplane", "diningtable", "pottedplant")


def test_preprocess_resizes_and_normalises():
    image = np.full((30, 60, 3), 255, dtype=np.uint8)
    fixed = Preprocess(fixed=(16, 16), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    x = fixed(image)
    assert x.shape == (3, 16, 16) and torch.allclose(x, torch.ones_like(x))
    assert Preprocess(short_side=10).size(30, 60) == (10, 20)
    assert Preprocess()(image).shape == (3, 30, 60)


def test_unknown_backend_and_missing_weights(tmp_path):
    with pytest.raises(UserError, match="unknown backend"):
        build_backend(backend_config("dino", tmp_path), CLASSES, torch.device("cpu"))
    with pytest.raises(UserError, match="needs weights"):
        build_backend(backend_config("toy", None), CLASSES, torch.device("cpu"))


def test_prompted_map_uses_readable_prompts_and_overrides():
    config = backend_config("clipseg", None, class_map=(("pottedplant", ("potted plant", "houseplant")),))
    mapping = build_class_map(CLASSES, config, prompted=True, no_object=False)
    assert mapping.outputs == ("background", "airplane", "dining table", "potted plant", "houseplant")
    assert mapping.groups == ((0,), (1,), (2,), (3, 4)) and not mapping.identity
    seem = build_class_map(CLASSES, config, prompted=True, no_object=True)
    assert seem.outputs[-1] == NO_OBJECT and seem.groups[0] == (4,)  # background takes SEEM's no-object
    prompt = build_class_map(CLASSES, replace(config, background="prompt"), prompted=True, no_object=True)
    assert prompt.outputs[0] == "background" and prompt.groups[0] == (0,)
    with pytest.raises(UserError, match="not classes of the data set"):
        build_class_map(CLASSES, replace(config, class_map=(("plant", ("x",)),)), prompted=True, no_object=False)
    with pytest.raises(UserError, match="is SEEM's"):
        build_class_map(CLASSES, replace(config, class_map=(("background", (NO_OBJECT,)),)), True, False)
    with pytest.raises(UserError, match="takes text prompts"):
        build_class_map(CLASSES, replace(config, outputs=("a",)), prompted=True, no_object=False)


def test_closed_set_map_sums_channels_and_zeroes_classes_without_output():
    config = backend_config("torchscript", None, outputs=("sky", "road", "car", "truck", "void"),
                            class_map=(("road", ("road",)), ("vehicle", ("car", "truck"))))
    classes = ("road", "vehicle", "sky", "tree")
    mapping = build_class_map(classes, config, prompted=False, no_object=False)
    assert mapping.groups == ((1,), (2, 3), (0,), ())  # sky by its own name; tree has no output
    logits = torch.randn(2, 5, 3, 4)
    probs = mapping.apply(logits, "logits")
    soft = logits.softmax(1)
    torch.testing.assert_close(probs[:, 1], soft[:, 2] + soft[:, 3])
    torch.testing.assert_close(probs[:, 0], soft[:, 1])
    assert torch.equal(probs[:, 3], torch.zeros_like(probs[:, 3]))
    assert mapping.score_kind("logits") == "probabilities" and mapping.score_kind("scores") == "scores"
    # void's mass is dropped, not redistributed: probabilities sum to less than one where the model says void
    torch.testing.assert_close(probs.sum(1), 1 - soft[:, 4])
    identity = build_class_map(classes, backend_config("torchscript", None), prompted=False, no_object=False)
    assert identity.identity and identity.apply(logits, "logits") is logits
    with pytest.raises(UserError, match=r"names \['bus'\], not outputs of the model"):
        build_class_map(classes, replace(config, class_map=(("vehicle", ("bus",)),)), False, False)


class TwoHeads(torch.nn.Module):
    """A closed-set model with more channels than the data set has classes."""

    def forward(self, x):
        pooled = torch.nn.functional.avg_pool2d(x, 4)
        return torch.cat([pooled, pooled[:, :1] * -1, pooled[:, 1:2] * 2], 1)  # 5 channels


def test_torchscript_channels_summed_per_class_end_to_end(toy_world, tmp_path):
    path = tmp_path / "five.pt"
    torch.jit.script(TwoHeads()).save(str(path))
    base = toy_config(toy_world)
    classes = Dataset(base).classes
    outputs = ("r", "g", "b", "neg", "double")
    config = replace(base, backend="torchscript", weights=path, work_dir=tmp_path / "work", outputs=outputs,
                     class_map=((classes[0], ("r", "neg")), (classes[1], ("double",))))
    result = run_logits(config, "labeled", workers=0, info=lambda m: None, warn=lambda m: None)
    store = LogitsStore(result["store"])
    assert store.score_kind == "probabilities" and store.attrs["class_map"]["classes"][classes[0]] == ["r", "neg"]
    sample = Dataset(base).split("labeled")[0]
    x = torch.from_numpy(read_image(sample.image)).permute(2, 0, 1)[None].float() / 255
    image_id = sample.id
    soft = TwoHeads()(x).softmax(1)[0]
    stored = torch.from_numpy(store.read(image_id))
    torch.testing.assert_close(stored[0], soft[0] + soft[3], atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(stored[1], soft[4], atol=2e-3, rtol=2e-3)
    assert float(stored[2:].abs().max()) == 0  # the other classes have no output
    assert torch.equal(to_probabilities(stored, store.score_kind), stored)
    with pytest.raises(UserError, match="store was made with other settings"):  # another map, another store
        run_logits(replace(config, class_map=()), "labeled", workers=0, info=lambda m: None, warn=lambda m: None)


def test_the_store_records_any_map_that_is_not_each_class_by_its_own_name():
    classes = ("background", "cat")
    own = build_class_map(classes, backend_config("torchscript", None), prompted=False, no_object=False)
    assert own.identity and own.describe(classes) is None
    renamed = build_class_map(classes, backend_config("clipseg", None, class_map=(("cat", ("kitty",)),)), True, False)
    assert renamed.identity and renamed.describe(classes)["classes"] == {"background": ["background"], "cat": ["kitty"]}


def test_an_output_serves_one_class_only():
    shared = backend_config("clipseg", None, class_map=(("pottedplant", ("plant",)), ("aeroplane", ("plant",))))
    with pytest.raises(UserError, match=r"'plant' is given to classes \['aeroplane', 'pottedplant'\]"):
        build_class_map(CLASSES, shared, prompted=True, no_object=False)
    twice = backend_config("torchscript", None, outputs=("a", "b", "a"))
    with pytest.raises(UserError, match=r"foundation.outputs names \['a'\] more than once"):
        build_class_map(("a", "b"), twice, prompted=False, no_object=False)
    again = backend_config("clipseg", None, class_map=(("aeroplane", ("plane", "plane")),))
    assert build_class_map(CLASSES, again, prompted=True, no_object=False).groups[1] == (1,)


def test_cuda_without_an_index_is_the_current_device(monkeypatch):
    from pipeline.stage0.logits import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert resolve_device("cuda") == torch.device("cuda", 1) == resolve_device("auto")
    assert resolve_device("cuda:0") == torch.device("cuda", 0) and resolve_device("cpu") == torch.device("cpu")


CHECKOUT = '''
import torch

class Net(torch.nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.head = torch.nn.Conv2d(3, channels, 1)

    def forward(self, x):
        return self.head(torch.nn.functional.avg_pool2d(x, 4))
'''
FACTORY = '''
def build():
    from thirdparty_net import Net  # from the user's checkout, on sys.path only while this runs
    return Net({channels})


def not_a_model():
    return 3
'''


def _factory_world(tmp_path, channels=5):
    (tmp_path / "checkout").mkdir(exist_ok=True)
    (tmp_path / "checkout" / "thirdparty_net.py").write_text(CHECKOUT)
    (tmp_path / "factory.py").write_text(FACTORY.format(channels=channels))
    return tmp_path / "factory.py"


def test_pytorch_factory_backend_end_to_end(toy_world, tmp_path):
    factory = _factory_world(tmp_path)
    import sys

    sys.path.insert(0, str(tmp_path / "checkout"))
    try:
        from thirdparty_net import Net

        torch.manual_seed(0)
        net = Net(5).eval()
    finally:
        sys.path.remove(str(tmp_path / "checkout"))
        sys.modules.pop("thirdparty_net", None)
    torch.save(net.state_dict(), tmp_path / "net.pth")
    base = toy_config(toy_world)
    classes = Dataset(base).classes
    config = replace(base, backend="pytorch", weights=tmp_path / "net.pth", work_dir=tmp_path / "work",
                     factory=f"{factory}:build", code=tmp_path / "checkout", resize=(16, 16),
                     mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), outputs=("a", "b", "c", "d", "e"),
                     class_map=((classes[0], ("a", "e")), (classes[1], ("b",)), (classes[2], ("c",))))
    result = run_logits(config, "labeled", workers=0, info=lambda m: None, warn=lambda m: None)
    assert str(tmp_path / "checkout") not in __import__("sys").path  # off the path again
    store = LogitsStore(result["store"])
    sample = Dataset(base).split("labeled")[0]
    x = torch.nn.functional.interpolate(torch.from_numpy(read_image(sample.image)).permute(2, 0, 1)[None].float(),
                                        size=(16, 16), mode="bilinear", antialias=True).round().clamp(0, 255)
    soft = net((x / 255 - 0.5) / 0.25).softmax(1)[0]
    stored = torch.from_numpy(store.read(sample.id))
    assert stored.shape == (len(classes), 4, 4) and store.score_kind == "probabilities"
    torch.testing.assert_close(stored[0], soft[0] + soft[4], atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(stored[1:3], soft[1:3], atol=2e-3, rtol=2e-3)
    with pytest.raises(UserError, match="store was made with other settings.*resize"):  # preprocessing is identity
        run_logits(replace(config, resize=(32, 32)), "labeled", workers=0, info=lambda m: None, warn=lambda m: None)


def test_pytorch_factory_errors_are_one_line(tmp_path):
    factory = _factory_world(tmp_path, channels=4)
    torch.save({"head.weight": torch.zeros(7, 3, 1, 1), "head.bias": torch.zeros(7)}, tmp_path / "other.pth")
    base = backend_config("pytorch", tmp_path / "other.pth", code=tmp_path / "checkout", outputs=("a", "b", "c", "d"))
    cases = [
        ("nocolon", "give 'module:function'"),
        (f"{tmp_path}/absent.py:build", "absent.py not found"),
        ("no_such_module_xyz:build", "importing no_such_module_xyz failed"),
        (f"{factory}:missing", "has no function 'missing'"),
        (f"{factory}:not_a_model", "returned a int, not a torch.nn.Module"),
        (f"{factory}:build", r"other.pth: does not fit the model of .*factory.py:build: 0 of its 2 tensors found, "
                             r"2 of another shape, 0 unexpected \(e.g. head.weight: \(7, 3, 1, 1\) in the checkpoint"),
    ]
    for spec, match in cases:
        with pytest.raises(UserError, match=match) as err:
            build_backend(replace(base, factory=spec), ("a", "b", "c", "d"), torch.device("cpu"))
        assert "\n" not in str(err.value)
