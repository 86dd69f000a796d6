from __future__ import annotations

import pytest
import torch

from pipeline.toy import SHIPPED_ANNOTATOR
from pipeline.errors import UserError
from pipeline.toy.annotator import STRIDE, ToyAnnotator, load_annotator, save_annotator
from pipeline.toy.world import CLASSES

SHIPPED = SHIPPED_ANNOTATOR


def test_shipped_weights_load_and_score():
    model, classes = load_annotator(SHIPPED)
    assert classes == CLASSES
    assert SHIPPED.stat().st_size <= 5 * 2**20
    with torch.no_grad():
        scores = model(torch.rand(2, 3, 128, 96))
    assert scores.shape == (2, len(CLASSES), 128 // STRIDE, 96 // STRIDE)
    assert torch.isfinite(scores).all()


def test_save_load_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = ToyAnnotator(5, width=8).eval()
    save_annotator(tmp_path / "a.pt", model, tuple("abcde"), {"note": 1})
    loaded, classes = load_annotator(tmp_path / "a.pt")
    x = torch.rand(1, 3, 32, 32)
    assert classes == tuple("abcde")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_wrong_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_annotator(tmp_path / "none.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(UserError, match="not a readable torch file"):
        load_annotator(tmp_path / "junk.pt")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="format tag"):
        load_annotator(tmp_path / "other.pt")
