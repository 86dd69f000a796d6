"""The compact score store (uint8 probabilities) and a stage 1 that upsamples only the classes that can matter."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import zarr

import pipeline.stage1.conformal as conformal
from conftest import work_copy
from pipeline.errors import UserError
from pipeline.stage0.store import LEGACY_CODE, UINT8_CODE, LogitsStore, encode, open_for_writing, uint8_code, write_scores
from pipeline.stage1.calibrate import Settings, filtered_mask, run_calibrate
from pipeline.stage1.conformal import (Candidates, ScoreHistogram, fit, grid_values, nonconformity, prediction_sets,
                                       to_bins, upsampler)
from pipeline.stage1.rawscore import raw_argmax

LEVELS = uint8_code(UINT8_CODE).levels

IDENTITY = {"classes": [f"c{i}" for i in range(150)], "backend": "t", "model_id": "m", "weights_sha256": "",
            "score_kind": "probabilities", "scale": "native", "class_map": None, "encoding": "uint8"}


def peaked(classes: int, h: int, w: int, seed: int) -> torch.Tensor:
    """(K, h, w) probabilities like a segmentation network's: a few regions, one confident class each, a long tail."""
    gen = torch.Generator().manual_seed(seed)
    region = torch.randint(0, classes, (4,), generator=gen)
    logits = torch.randn(1, classes, 3, 4, generator=gen) * 2.0  # a smooth tail, as a network's outputs are
    logits = torch.nn.functional.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)[0]
    for i, cls in enumerate(region):
        logits[cls, (i // 2) * h // 2:(i // 2 + 1) * h // 2, (i % 2) * w // 2:(i % 2 + 1) * w // 2] += 9.0
    return logits.softmax(0)


def _store(tmp_path, images: dict[str, torch.Tensor], size=(37, 50), encoding="uint8") -> LogitsStore:
    path = tmp_path / "logits.zarr"
    open_for_writing(path, {**IDENTITY, "classes": IDENTITY["classes"][:len(next(iter(images.values())))],
                            "encoding": encoding}, force=False)
    for image_id, p in images.items():
        write_scores(path, image_id, encode(p, "probabilities", encoding), size)
    return LogitsStore(path)


def test_uint8_round_trip_is_the_level_of_its_range_and_plain_zarr_reads_it(tmp_path, monkeypatch):
    p = peaked(150, 12, 17, seed=0)
    store = _store(tmp_path, {"a": p})
    decoded = store.read("a")
    code = uint8_code(UINT8_CODE)
    bounds = np.concatenate([[0.0], code.edges, [1.0]])
    value = np.searchsorted(code.edges, p.double().numpy(), side="right")  # edges[v-1] <= p < edges[v]
    np.testing.assert_array_equal(decoded, code.levels[value])
    inside = (bounds[value] <= decoded) & (decoded < bounds[value + 1])
    assert inside.all() and (decoded[value == 0] == 0).all()
    raw = zarr.open_array(store.path / "scores" / "a", mode="r")  # plain zarr, the levels in the attributes
    assert raw.dtype == np.uint8 and store.attrs["uint8_code"] == UINT8_CODE
    np.testing.assert_array_equal(np.take(np.float32(store.attrs["levels"]), raw[...]), decoded)
    assert (raw[...] == 0).mean() > 0.5  # a long tail rounds to 0: what makes the store small
    monkeypatch.setattr(LogitsStore, "_array", lambda *a: pytest.fail("read through zarr's machinery"))
    np.testing.assert_array_equal(store.read("a"), decoded)  # the direct decode of the tool's own layout


def test_the_uint8_code_keeps_every_threshold_at_an_edge_exact():
    """The edges are values of stage 1's score grid, a grid step apart at small probabilities: a threshold there
    puts a probability and its stored level on the same side (the comparison stage 1 makes, 1 - p <= q)."""
    code = uint8_code(UINT8_CODE)
    grid = 1 - grid_values().double().numpy()
    assert np.isin(code.edges, grid).all() and (np.diff(code.edges) > 0).all()
    step = 2.0 ** -11  # the grid's step in probability below 0.5
    assert code.edges[0] == step and np.allclose(np.diff(code.edges[:5]), step)  # every step up to 0.0024
    gaps = np.diff(code.edges)  # the power curve's spacing elsewhere, never more than 1.5 of its own step apart
    power = (np.arange(256) / 255.0) ** 1.5
    assert (gaps[5:] <= 1.5 * np.diff((power[1:] + power[:-1]) / 2)[5:] + step).all()
    gen = torch.Generator().manual_seed(0)
    p = torch.cat([torch.rand(100_000, generator=gen) ** 4, torch.from_numpy(code.edges).float()])
    p = torch.cat([p, p.nextafter(torch.tensor(0.0)), p.nextafter(torch.tensor(1.0))]).clamp(0, 1)
    stored = torch.from_numpy(code.levels[encode(p[:, None, None], "probabilities", "uint8")[:, 0, 0]])
    q = torch.from_numpy(1 - code.edges).float()  # the thresholds admitting p >= each edge
    assert torch.equal(prediction_sets(p.expand(255, -1), q), prediction_sets(stored.expand(255, -1), q))
    assert torch.equal(to_bins(nonconformity(p[p < 0.0024])), to_bins(nonconformity(stored[p < 0.0024])))


def test_a_uint8_store_from_before_the_grid_code_is_read_and_completed_with_its_own(tmp_path):
    legacy = uint8_code(LEGACY_CODE)
    np.testing.assert_array_equal(legacy.levels, ((np.arange(256) / 255.0) ** 1.5).astype(np.float32))
    p = peaked(20, 12, 17, seed=4)
    path = tmp_path / "logits.zarr"
    old = {**IDENTITY, "classes": IDENTITY["classes"][:20], "uint8_code": LEGACY_CODE}
    open_for_writing(path, old, force=False)
    write_scores(path, "a", encode(p, "probabilities", "uint8", LEGACY_CODE), (37, 50))
    group = zarr.open_group(path, mode="r+")
    for key in ("uint8_code", "levels"):  # what the version before wrote
        del group.attrs[key]
    group.attrs["decode"] = "probability = (value / 255) ** 1.5"
    store = LogitsStore(path)
    nearest = legacy.levels[np.abs(p.double().numpy()[..., None] - legacy.levels).argmin(-1)]
    np.testing.assert_allclose(store.read("a"), nearest, rtol=1e-6, atol=1e-9)
    with pytest.raises(UserError, match="uint8_code: stored \"power-1.5\" vs now \"grid-1.5\""):
        open_for_writing(path, {**old, "uint8_code": UINT8_CODE}, force=False)  # no mixing of codes
    open_for_writing(path, old, force=False)  # completing it with its own code is allowed
    group.attrs["uint8_code"] = "grid-9"  # written by a later version
    with pytest.raises(UserError, match="newer than this conformalsam"):
        LogitsStore(path).read("a")


def test_logits_completes_a_uint8_store_in_its_own_code(toy_world, tmp_path, monkeypatch):
    from conftest import toy_config
    import pipeline.stage0.logits as logits
    from pipeline.toy import SHIPPED_ANNOTATOR

    config = replace(toy_config(toy_world), weights=SHIPPED_ANNOTATOR, work_dir=tmp_path / "w")
    logits.run_logits(config, "labeled", workers=0)
    assert LogitsStore(tmp_path / "w/logits.zarr").attrs["uint8_code"] == UINT8_CODE
    del zarr.open_group(tmp_path / "w/logits.zarr", mode="r+").attrs["uint8_code"]  # as the version before wrote
    codes = []
    real = logits.encode
    monkeypatch.setattr(logits, "encode", lambda *a: codes.append(a[3]) or real(*a))
    logits.run_logits(config, "unlabeled", workers=0)
    assert codes and set(codes) == {LEGACY_CODE}
    zarr.open_group(tmp_path / "w/logits.zarr", mode="r+").attrs["uint8_code"] = "grid-9"  # a later version's
    monkeypatch.setattr(logits, "load_backend", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(UserError, match="newer than this conformalsam"):
        logits.run_logits(config, "val", workers=0)
    monkeypatch.undo()
    codes.clear()
    monkeypatch.setattr(logits, "encode", lambda *a: codes.append(a[3]) or real(*a))
    logits.run_logits(config, "unlabeled", workers=0, force=True)  # a rebuilt store gets the current code
    assert codes and set(codes) == {UINT8_CODE}


@pytest.mark.parametrize("kind", ["logits", "scores"])
def test_every_score_kind_is_encoded_as_its_probabilities(kind):
    torch.manual_seed(0)
    scores = torch.randn(6, 5, 7) * 3 if kind == "logits" else torch.rand(6, 5, 7) * 4
    p = scores.softmax(0) if kind == "logits" else scores / scores.sum(0)
    np.testing.assert_array_equal(encode(scores, kind, "uint8"), encode(p, "probabilities", "uint8"))


def _dense(monkeypatch):
    """Every class upsampled everywhere: what stage 1 computed before it left out the classes that cannot matter."""
    real = Candidates.rows
    calls = []

    def every_class(self, lo, hi):
        calls.append(len(real(self, lo, hi)))
        return torch.arange(self.num_classes)

    monkeypatch.setattr(conformal.Candidates, "rows", every_class)
    return calls


@pytest.mark.parametrize("rule", ["paper", "singleton", "argmax"])
@pytest.mark.parametrize("background", [None, 0])
def test_upsampling_only_the_candidate_classes_changes_no_mask(tmp_path, monkeypatch, rule, background):
    store = _store(tmp_path, {f"im{i}": peaked(150, 12, 17, seed=i) for i in range(3)})
    gen = torch.Generator().manual_seed(1)
    per_class = torch.rand(150, generator=gen) * 0.3 + 0.7  # mondrian-like; some near 1: p >= a few 1e-3
    per_class[:5] = torch.tensor([0.999, 0.998, 0.9995, 0.99, 0.5])
    for q in (torch.full((150,), 0.6), torch.full((150,), 0.97), per_class):
        for image_id in store.ids():
            probs = store.probabilities(image_id)
            keep = Candidates(probs, q).rows(0, probs.shape[1])
            assert len(keep) < 150 // 3  # most of the 150 classes cannot matter, and are not upsampled
            restricted = filtered_mask(store, image_id, q, rule, background, second=True)
            with monkeypatch.context() as patch:
                restricted_sizes = _dense(patch)
                dense = filtered_mask(store, image_id, q, rule, background, second=True)
            assert restricted_sizes and max(restricted_sizes) < 150  # the reference really upsampled more
            for a, b in zip(restricted[:3], dense[:3]):  # label, raw argmax, set sizes: bit for bit
                assert torch.equal(a, b)
            assert torch.equal(restricted[3][0], dense[3][0])  # the best probability
            assert torch.equal(restricted[3][1], dense[3][1])  # a second best below 2^-7 is 0 in both
            assert (dense[3][1] == 0).any() and (dense[3][1] >= 2.0 ** -7).any()
            with monkeypatch.context() as patch:
                _dense(patch)
                assert torch.equal(raw_argmax(store, image_id), restricted[1])


def test_held_out_diagnostics_equal_the_dense_computation(toy_world, scored, tmp_path, monkeypatch):
    from pipeline.data.datasets import Dataset
    from pipeline.stage1.calibrate import accumulate, assign_folds
    from pipeline.stage1.held_out import held_out

    config = work_copy(toy_world, scored, tmp_path)
    dataset, store = Dataset(config), LogitsStore(config.work_dir / "logits.zarr")
    labeled = dataset.split("labeled")
    for mode, rule in (("paper", "paper"), ("mondrian", "singleton"), ("crc", "paper")):
        settings = Settings(mode=mode, rule=rule)
        hist = accumulate(store, dataset, labeled, settings, jobs=1)
        args = (store, dataset, labeled, assign_folds(labeled, settings), hist, mode, rule, (0.05, 0.1, 0.2, 0.4))
        restricted = held_out(*args)
        with monkeypatch.context() as patch:
            _dense(patch)
            dense = held_out(*args)
        assert restricted.alphas == dense.alphas and len(dense.alphas) >= 3
        np.testing.assert_array_equal(restricted.confusion, dense.confusion)
        np.testing.assert_array_equal(restricted.top1, dense.top1)


def test_crc_on_uint8_scores_keeps_its_finite_sample_guarantee():
    """CRC bounds the expected fraction of an image's pixels outside their set by alpha for exchangeable images,
    for any score function fitted and applied the same way: here 1 - p of 8-bit probabilities (with ties)."""
    k, alpha, n_cal, reps = 20, 0.1, 40, 60
    images = []
    for i in range(n_cal + 20):
        p = torch.from_numpy(LEVELS[encode(peaked(k, 8, 8, seed=100 + i), "probabilities", "uint8")])  # with ties
        p_up = upsampler((8, 8), (16, 16)).full(p)
        truth = torch.multinomial(p_up.reshape(k, -1).T.clamp_min(1e-9), 1, generator=torch.Generator().manual_seed(i))
        images.append((truth.reshape(16, 16), to_bins(nonconformity(p_up.gather(0, truth.reshape(1, 16, 16))[0]))))
    rng = np.random.default_rng(0)
    risks = []
    for _ in range(reps):
        order = rng.permutation(len(images))
        hist = ScoreHistogram(k)
        for i in order[:n_cal]:
            hist.add(*images[i])
        q_bin = to_bins(fit(hist, alpha, "crc").q[:1])[0]
        risks += [float((bins > q_bin).float().mean()) for _, bins in (images[i] for i in order[n_cal:])]
    risks = np.array(risks)
    assert risks.mean() <= alpha + 3 * risks.std(ddof=1) / math.sqrt(len(risks) / 20)  # 20 test images per split
    assert risks.mean() > alpha / 3  # not vacuous: the sets are not everything


def test_a_float16_store_from_before_encodings_still_calibrates(toy_world, tmp_path):
    from conftest import toy_config
    from pipeline.stage0.logits import run_logits
    from pipeline.toy import SHIPPED_ANNOTATOR

    config = replace(toy_config(toy_world), weights=SHIPPED_ANNOTATOR, work_dir=tmp_path / "old")
    for split in ("labeled", "unlabeled"):
        run_logits(config, split, workers=0, encoding="float16")
    new = run_calibrate(config, Settings(), jobs=1, warn=lambda m: None)
    group = zarr.open_group(tmp_path / "old/logits.zarr", mode="r+")
    for key in ("encoding", "decode"):  # what earlier versions wrote
        del group.attrs[key]
    (tmp_path / "old/calibration.json").unlink()
    old = run_calibrate(config, Settings(), jobs=1, warn=lambda m: None)
    assert old["qhat"] == new["qhat"] and old["diagnostics"]["unlabeled"] == new["diagnostics"]["unlabeled"]
    assert LogitsStore(tmp_path / "old/logits.zarr").encoding == "float16"


@pytest.mark.parametrize("background", [None, 1])
def test_pseudo_label_shortcut_equals_the_rules_definition(background):
    """The most probable class decides wherever it is a member; elsewhere the members are searched."""
    from pipeline.stage1.conformal import prediction_sets, pseudo_label

    gen = torch.Generator().manual_seed(3)
    p = torch.rand(6, 9, 11, generator=gen) ** 3
    p /= p.sum(0)
    for q in (torch.full((6,), 0.7), torch.rand(6, generator=gen) * 0.6 + 0.4):  # pooled, then per class
        sets = prediction_sets(p, q)
        for rule in ("paper", "singleton", "argmax"):
            got = pseudo_label(p, sets, rule, background)
            for y in range(9):
                for x in range(11):
                    members = [c for c in range(6) if sets[c, y, x]]
                    if rule == "argmax":
                        want = int(p[:, y, x].argmax())
                    elif rule == "singleton":
                        want = members[0] if len(members) == 1 else 255
                    elif not members:
                        want = 255
                    else:
                        others = [c for c in members if c != background] or members
                        want = max(others, key=lambda c: float(p[c, y, x]))
                    assert int(got[y, x]) == want, (rule, y, x)
