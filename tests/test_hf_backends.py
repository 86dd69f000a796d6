"""CLIPSeg through transformers, on a tiny random-weight config (offline): feature reuse is exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import backend_config  # noqa: E402
from pipeline.backends import build_backend  # noqa: E402
from pipeline.backends.hf import ClipSegBackend  # noqa: E402
from pipeline.errors import UserError  # noqa: E402

CLASSES = ("background", "cat", "dog")
IDS = torch.tensor([[0, 5, 7, 1, 1], [0, 9, 1, 1, 1], [0, 11, 12, 13, 1]])


@pytest.fixture
def tiny_clipseg(tmp_path, monkeypatch):
    torch.manual_seed(0)
    config = transformers.CLIPSegConfig(
        text_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                         vocab_size=99, max_position_embeddings=40),
        vision_config=dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=37,
                           image_size=32, patch_size=8),
        projection_dim=16, extract_layers=[0, 1, 2], reduce_dim=16, decoder_num_attention_heads=2,
        decoder_intermediate_size=32, conditional_layer=1)
    model = transformers.CLIPSegForImageSegmentation(config).eval()
    model.save_pretrained(tmp_path / "clipseg")
    # tokenizers need the hub: feed integer ids instead
    monkeypatch.setattr(ClipSegBackend, "_tokenize", lambda self, w, prompts: (IDS, torch.ones_like(IDS)))
    return tmp_path / "clipseg", model


def test_clipseg_scores_equal_per_prompt_forward(tiny_clipseg):
    folder, model = tiny_clipseg
    backend = build_backend(backend_config("clipseg", folder), CLASSES, torch.device("cpu"))[0]
    assert backend.score_kind == "logits" and len(type(backend).fingerprint(folder, None)[1]) == 64
    images = np.random.default_rng(0).integers(0, 256, (2, 40, 50, 3), dtype=np.uint8)
    batch = torch.stack([backend.preprocess(im) for im in images])
    assert batch.shape == (2, 3, 32, 32)
    scores = backend.predict(batch)
    assert scores.shape == (2, 3, 32, 32)
    with torch.no_grad():
        for k in range(3):  # reference: the model's own forward, one prompt at a time
            ref = model(pixel_values=batch, input_ids=IDS[k:k + 1].expand(2, -1),
                        attention_mask=torch.ones(2, IDS.shape[1], dtype=torch.long)).logits
            torch.testing.assert_close(scores[:, k], ref.reshape(2, 32, 32), atol=1e-4, rtol=1e-4)


def test_clipseg_bad_folder(tmp_path):
    with pytest.raises(UserError, match="cannot load a CLIPSegForImageSegmentation"):
        build_backend(backend_config("clipseg", tmp_path), CLASSES, torch.device("cpu"))


def test_sam3_scores_equal_per_prompt_forward(tmp_path, monkeypatch):
    torch.manual_seed(0)
    h = 32
    config = transformers.Sam3Config(
        vision_config=dict(
            backbone_config=dict(model_type="sam3_vit_model", hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=2, image_size=56, patch_size=14,
                                 window_size=2, global_attn_indexes=[1], pretrain_image_size=28),
            fpn_hidden_size=h, backbone_feature_sizes=[[16, 16], [8, 8], [4, 4]], scale_factors=[4.0, 2.0, 1.0]),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         vocab_size=99, max_position_embeddings=40, projection_dim=32, bos_token_id=0,
                         eos_token_id=1, pad_token_id=1),
        geometry_encoder_config=dict(hidden_size=h, num_layers=1, num_attention_heads=2, intermediate_size=64),
        detr_encoder_config=dict(hidden_size=h, num_layers=1, num_attention_heads=2, intermediate_size=64),
        detr_decoder_config=dict(hidden_size=h, num_layers=1, num_queries=5, num_attention_heads=2,
                                 intermediate_size=64),
        mask_decoder_config=dict(hidden_size=h, num_attention_heads=2))
    model = transformers.Sam3Model(config).eval()
    model.save_pretrained(tmp_path / "sam3")
    from pipeline.backends.hf import Sam3Backend

    monkeypatch.setattr(Sam3Backend, "_tokenize", lambda self, w, prompts: (IDS, torch.ones_like(IDS)))
    backend = build_backend(backend_config("sam3", tmp_path / "sam3"), CLASSES, torch.device("cpu"))[0]
    images = np.random.default_rng(1).integers(0, 256, (2, 40, 50, 3), dtype=np.uint8)
    batch = torch.stack([backend.preprocess(im) for im in images])
    assert batch.shape == (2, 3, 56, 56)
    scores = backend.predict(batch)
    assert scores.shape == (2, 3, 16, 16) and backend.score_kind == "logits"
    with torch.no_grad():
        for k in range(3):
            ref = model(pixel_values=batch, input_ids=IDS[k:k + 1].expand(2, -1),
                        attention_mask=torch.ones(2, IDS.shape[1], dtype=torch.long)).semantic_seg[:, 0]
            torch.testing.assert_close(scores[:, k], ref, atol=1e-4, rtol=1e-4)
