"""Backends: the SEEM adapter against a fake that mirrors SEEM; preprocessing."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import fake_seem
from pipeline.backends import Preprocess, build_backend
from pipeline.errors import UserError

CLASSES = ("background", "aeroplane", "diningtable", "person")


@pytest.fixture(params=[True, False], ids=["seem-package", "v1.0-layout"])
def seem(request, tmp_path, monkeypatch):
    fake_seem.install(tmp_path, package=request.param)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [m for m in sys.modules if m.split(".")[0] in ("seem", "modeling", "utils")]:
        del sys.modules[name]


def test_seem_adapter_vocabulary_heads_and_scores(seem, tmp_path):
    weights = tmp_path / "seem_focalt_v1.pt"
    weights.write_bytes(b"checkpoint")
    backend = build_backend("seem", weights, CLASSES, torch.device("cpu"))
    core = backend.model.model
    assert core.vocabulary == ["background", "airplane", "dining table", "person", "background"]
    assert core.built_with["PANOPTIC_ON"] is False and core.built_with["INSTANCE_ON"] is False
    assert core.sem_seg_head.num_classes == 4 and backend.model.loaded == str(weights)
    assert backend.score_kind == "scores" and backend.model_id == "seem:seem_focalt_v1.pt"
    image = np.random.default_rng(0).integers(0, 256, (375, 500, 3), dtype=np.uint8)
    x = backend.preprocess(image)
    assert x.dtype == torch.uint8 and tuple(x.shape) == (3, 512, 683)  # shorter side 512
    scores = backend.predict(torch.stack([x, x, x]))
    assert core.calls == [3]  # one batched evaluate call
    assert scores.shape == (3, 4, 128, 171) and (scores >= 0).all()
    assert not torch.allclose(scores.sum(1), torch.ones(1))  # unnormalised, as SEEM's sem_seg


def test_seem_missing_or_unconfigured_is_clear(tmp_path, monkeypatch):
    weights = tmp_path / "custom.pt"
    weights.write_bytes(b"x")
    with pytest.raises(UserError, match="SEEM is not installed"):
        build_backend("seem", weights, CLASSES, torch.device("cpu"))
    fake_seem.install(tmp_path, package=True)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(UserError, match="no SEEM model config found"):
            build_backend("seem", weights, CLASSES, torch.device("cpu"))
        (tmp_path / "custom.yaml").write_text("MODEL: {}\n")  # a config beside the checkpoint is used
        assert build_backend("seem", weights, CLASSES, torch.device("cpu")).num_classes == 4
    finally:
        for name in [m for m in sys.modules if m.split(".")[0] == "seem"]:
            del sys.modules[name]


def test_preprocess_resizes_and_normalises():
    image = np.full((30, 60, 3), 255, dtype=np.uint8)
    fixed = Preprocess(fixed=(16, 16), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    x = fixed(image)
    assert x.shape == (3, 16, 16) and torch.allclose(x, torch.ones_like(x))
    assert Preprocess(short_side=10).size(30, 60) == (10, 20)
    assert Preprocess()(image).shape == (3, 30, 60)


def test_unknown_backend_and_missing_weights(tmp_path):
    with pytest.raises(UserError, match="unknown backend"):
        build_backend("dino", tmp_path, CLASSES, torch.device("cpu"))
    with pytest.raises(UserError, match="needs weights"):
        build_backend("toy", None, CLASSES, torch.device("cpu"))
