"""Stage II methods (`self`, `unimatch`): UniMatch's step learns and really uses its feature-perturbation
branch and both strong views; both methods resume exactly (UniMatch under torchrun: test_own_network)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from conftest import fresh
from pipeline.data.datasets import Dataset
from pipeline.errors import UserError
from test_trainer import TINY, fixed_batch
from trainer.checkpoint import load_checkpoint
from trainer.data import TrainImages
from trainer.losses import Criterion
from trainer.methods import get_method, unimatch
from trainer.models import Segmenter, build_model
from trainer.stages import run_dir, train_stage


def unlabeled_batch(x: torch.Tensor, seed: int = 1) -> dict:
    """Weak view = x; two strong views (x recoloured); a CutMix box in each view (different ones)."""
    gen = torch.Generator().manual_seed(seed)
    n, _, h, w = x.shape
    box, box_2 = torch.zeros(n, h, w, dtype=torch.bool), torch.zeros(n, h, w, dtype=torch.bool)
    box[:, 8:24, 8:24], box_2[:, 16:40, 4:20] = True, True
    return {"image": x, "strong": x * 0.8 + 0.2 * torch.randn(x.shape, generator=gen), "box": box,
            "strong_2": x * 1.2 + 0.2 * torch.randn(x.shape, generator=gen), "box_2": box_2,
            "valid": torch.ones(n, h, w, dtype=torch.bool)}


@pytest.mark.parametrize("name", ["deeplabv3plus-tiny", "segformer-tiny"])
def test_a_unimatch_step_reduces_the_loss_on_a_fixed_batch(name):
    torch.manual_seed(0)
    model = Segmenter(build_model(name, 4), 4, name)
    x, y = fixed_batch()
    batch_l = {"image": x, "mask": y, "valid": torch.ones_like(y, dtype=torch.bool)}
    batch_u = unlabeled_batch(x)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    totals = []
    for _ in range(15):
        sup, unsup = unimatch.losses(model, None, batch_l, batch_u, Criterion(threshold=0.0))
        loss = 0.5 * sup + 0.5 * unsup
        opt.zero_grad()
        loss.backward()
        opt.step()
        totals.append(loss.item())
    assert totals[-1] < 0.7 * totals[0], totals


def test_unimatch_uses_its_feature_perturbation_and_both_strong_views():
    torch.manual_seed(0)
    model = Segmenter(build_model("deeplabv3plus-tiny", 4), 4, "deeplabv3plus-tiny").train()
    x, y = fixed_batch()
    batch_l = {"image": x, "mask": y, "valid": torch.ones_like(y, dtype=torch.bool)}
    batch_u = unlabeled_batch(x)
    for key in ("strong", "strong_2"):
        batch_u[key].requires_grad_(True)
    torch.manual_seed(1)
    _, unsup = unimatch.losses(model, None, batch_l, batch_u, Criterion(threshold=0.0))
    unsup.backward()
    for key in ("strong", "strong_2"):  # each strong view is a term of the loss
        assert batch_u[key].grad is not None and batch_u[key].grad.abs().sum() > 0, key

    # the perturbed branch is decoded from dropped-out features and weighed in: without the dropout
    # (the same model, perturbed output = clean output) the loss is another number
    forward = model.forward

    def no_dropout(images, perturb=False):
        out = forward(images)
        return (out, out) if perturb else out

    torch.manual_seed(1)
    with torch.no_grad():
        _, with_fp = unimatch.losses(model, None, batch_l, batch_u, Criterion(threshold=0.0))
    model.forward = no_dropout
    torch.manual_seed(1)
    with torch.no_grad():
        _, without = unimatch.losses(model, None, batch_l, batch_u, Criterion(threshold=0.0))
    assert abs(with_fp.item() - without.item()) > 1e-3 * with_fp.item()

    # the perturbed output differs from the clean one, for both families, and only in training mode
    for name in ("deeplabv3plus-tiny", "segformer-tiny"):
        net = Segmenter(build_model(name, 4), 4, name).train()
        clean, perturbed = net(x, perturb=True)
        assert clean.shape == perturbed.shape == (4, 4, 48, 48) and not torch.allclose(clean, perturbed)
        net.eval()
        clean, perturbed = net(x, perturb=True)
        torch.testing.assert_close(clean, perturbed)


def test_two_strong_views_are_drawn_independently_and_keep_the_first_as_it_was(toy_world, calibrated, tmp_path):
    dataset = Dataset(fresh(toy_world, calibrated, tmp_path))
    one = TrainImages(dataset, dataset.split("unlabeled"), "unlabeled", TINY)[2]
    two = TrainImages(dataset, dataset.split("unlabeled"), "unlabeled", TINY, strong_views=2)[2]
    assert set(two) == set(one) | {"strong_2", "box_2"}
    for key, value in one.items():
        assert torch.equal(value, two[key]), key
    assert not torch.equal(two["strong"], two["strong_2"])


class Crash(Exception):
    pass


@pytest.mark.parametrize("method,ema", [("self", 0.0), ("unimatch", 0.0), ("unimatch", 0.9)])
def test_stage_two_resumes_exactly(toy_world, calibrated, tmp_path, method, ema):
    # the 64-labeled split: its 6 unlabeled images (masks from the 16 split's calibration) make 1 step an epoch
    splits = toy_world / "splits" / "64"
    config = replace(fresh(toy_world, calibrated, tmp_path), labeled=splits / "labeled.txt",
                     unlabeled=splits / "unlabeled.txt")
    quiet = dict(log=lambda *_: None, deterministic=True)
    recipe = replace(TINY, epochs=(1, 3), threshold=0.5, ema=ema)
    train_stage(config, "t", recipe, 1, name="run", **quiet)
    straight = train_stage(config, "t", recipe, 2, name="run", method=method, **quiet)
    assert straight["run_dir"] == str(run_dir(config, "run", 2, method))

    def crash_after_first(record):
        if record["epoch"] == 1:
            raise Crash

    start = run_dir(config, "run", 1) / "last.pt"
    with pytest.raises(Crash):
        train_stage(config, "t", recipe, 2, name="again", init=start, method=method, on_epoch=crash_after_first,
                    **quiet)
    resumed = train_stage(config, "t", recipe, 2, name="again", init=start, method=method, resume=True, **quiet)
    a = load_checkpoint(run_dir(config, "run", 2, method) / "last.pt")
    b = load_checkpoint(run_dir(config, "again", 2, method) / "last.pt")
    assert a["epoch"] == b["epoch"] == 3 and a["identity"]["inputs"]["method"] == method
    for part in ("model", "student"):
        for key, value in (a[part] or {}).items():
            assert torch.equal(value, b[part][key]), (part, key)
    assert resumed["best"] == straight["best"]


def test_an_unknown_method_is_one_clear_error(toy_world, calibrated, tmp_path):
    with pytest.raises(UserError, match="--method fixmatch: unknown stage II method; choose one of self, unimatch"):
        get_method("fixmatch")
    config = fresh(toy_world, calibrated, tmp_path)
    with pytest.raises(UserError, match="--method"):
        train_stage(config, "t", TINY, 2, name="run", method="fixmatch")
