"""Stage 0: the score store is complete, reusable, safe against mismatches, resumable and shardable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
import zarr

from conftest import toy_config
from pipeline import PROJECT_ROOT
from pipeline.toy import SHIPPED_ANNOTATOR
from pipeline.data.datasets import Dataset
from pipeline.errors import UserError
from pipeline.stage0.logits import run_logits
from pipeline.stage0.store import LogitsStore, complete_ids, uint8_code
from pipeline.toy.annotator import load_annotator

ANNOTATOR = SHIPPED_ANNOTATOR


class SlowNet(torch.nn.Module):
    """A TorchScript-able scorer, deliberately heavy enough (~30 ms/image) to be killed part-way."""

    def __init__(self, classes: int, depth: int = 24, out: float = 1.0):
        super().__init__()
        self.inp = torch.nn.Conv2d(3, 48, 3, padding=1)
        self.body = torch.nn.ModuleList(torch.nn.Conv2d(48, 48, 3, padding=1) for _ in range(depth))
        self.head = torch.nn.Conv2d(48, classes, 1)
        self.out = out

    def forward(self, x):
        x = torch.relu(self.inp(x))
        for conv in self.body:
            x = x + torch.relu(conv(x)) * 0.1
        return self.head(torch.nn.functional.avg_pool2d(x, 4)) * self.out


def _script(tmp_path, classes=8, name="net.pt", **kw) -> str:
    torch.manual_seed(0)
    path = tmp_path / name
    torch.jit.script(SlowNet(classes, **kw).eval()).save(str(path))
    return path


def _same_store(a, b) -> None:
    sa, sb = LogitsStore(a), LogitsStore(b)
    assert sa.ids() == sb.ids() and len(sa) > 0
    for image_id in sa.ids():
        np.testing.assert_array_equal(sa.read(image_id), sb.read(image_id), err_msg=image_id)
        assert sa.image_size(image_id) == sb.image_size(image_id)
    for key in ("classes", "backend", "model_id", "weights_sha256", "score_kind", "scale", "encoding", "failed"):
        assert sa.attrs[key] == sb.attrs[key], key


@pytest.mark.parametrize("encoding", [None, "float16"])
def test_toy_store_holds_native_resolution_scores_in_its_encoding(toy_world, tmp_path, encoding):
    config = replace(toy_config(toy_world), weights=ANNOTATOR, work_dir=tmp_path / "w")
    result = run_logits(config, "all", batch_size=16, workers=0, encoding=encoding)
    ids = {s.id for split in ("labeled", "unlabeled", "val") for s in Dataset(config).split(split)}
    assert result["written"] == len(ids) == 76 and result["failed"] == 0
    raw = zarr.open_group(tmp_path / "w/logits.zarr", mode="r")  # plain zarr reads it
    assert set(raw["scores"].keys()) == ids
    arr = raw["scores"]["val_00000"]
    assert arr.shape == (8, 8, 8) and arr.chunks == arr.shape
    assert raw.attrs["classes"][0] == "background"
    assert len(raw.attrs["weights_sha256"]) == 64 and raw.attrs["tool_version"]
    model, _ = load_annotator(ANNOTATOR)
    image, _ = Dataset(config).load(Dataset(config).split("val")[0])
    with torch.no_grad():
        expected = model(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255)[0]
    store = LogitsStore(tmp_path / "w/logits.zarr")
    probs = store.probabilities("val_00000")
    if encoding is None:  # the default: 8-bit probabilities, decoded as the store's attributes say
        assert arr.dtype == np.uint8 and raw.attrs["encoding"] == "uint8" and raw.attrs["score_kind"] == "probabilities"
        assert raw.attrs["decode"] == "probability = levels[value] (the attribute levels)"
        np.testing.assert_array_equal(np.take(np.float32(raw.attrs["levels"]), arr[...]), probs.numpy())
        edges = np.concatenate([[0.0], uint8_code(raw.attrs["uint8_code"]).edges, [1.0]])
        value = arr[...].astype(int)  # the probability lies in its value's range
        truth = expected.softmax(0).numpy()
        assert ((edges[value] <= truth + 1e-6) & (truth < edges[value + 1] + 1e-6)).all()
        assert ((edges[value] <= probs.numpy()) & (probs.numpy() < edges[value + 1])).all()  # and so does its level
    else:
        assert arr.dtype == np.float16 and raw.attrs["encoding"] == "float16" and raw.attrs["score_kind"] == "logits"
        np.testing.assert_allclose(store.read("val_00000"), expected.numpy(), atol=2e-2, rtol=1e-3)
        torch.testing.assert_close(probs.sum(0), torch.ones(8, 8), atol=1e-3, rtol=0)
    assert store.encoding == raw.attrs["encoding"]
    assert store.image_size("val_00000") == (32, 32)
    again = run_logits(config, "all", batch_size=16, workers=0)  # no --encoding: the store's own
    assert again["written"] == 0 and again["skipped"] == 76
    other = "float16" if encoding is None else "uint8"
    with pytest.raises(UserError, match=f'encoding: stored "{raw.attrs["encoding"]}" vs now "{other}".*--force'):
        run_logits(config, "all", workers=0, encoding=other)
    with pytest.raises(UserError, match="--encoding int4: choose uint8 or float16"):
        run_logits(config, "all", workers=0, encoding="int4")


def test_a_store_from_before_encodings_is_float16_and_is_completed_as_such(toy_world, tmp_path):
    config = replace(toy_config(toy_world), weights=ANNOTATOR, work_dir=tmp_path / "w")
    run_logits(config, "labeled", workers=0, encoding="float16")
    group = zarr.open_group(tmp_path / "w/logits.zarr", mode="r+")
    for key in ("encoding", "decode"):  # as written by earlier versions
        del group.attrs[key]
    assert run_logits(config, "unlabeled", workers=0)["written"] == 54
    store = LogitsStore(tmp_path / "w/logits.zarr")
    assert store.encoding == "float16" and "encoding" not in store.attrs
    assert {store.read(i).dtype for i in store.ids()} == {np.dtype(np.float32)}
    assert zarr.open_array(tmp_path / "w/logits.zarr/scores" / store.ids()[-1]).dtype == np.float16


def test_scale_option_and_splits(toy_world, tmp_path):
    config = replace(toy_config(toy_world), weights=ANNOTATOR, work_dir=tmp_path / "w")
    result = run_logits(config, "labeled", batch_size=4, workers=0, scale=0.5)
    assert result["written"] == 16
    assert LogitsStore(tmp_path / "w/logits.zarr").read(complete_ids(tmp_path / "w/logits.zarr")[0]).shape == (8, 16, 16)
    with pytest.raises(UserError, match="--split"):
        run_logits(config, "train", workers=0)


def test_mismatched_store_is_refused_then_rebuilt_with_force(toy_world, tmp_path):
    config = replace(toy_config(toy_world), weights=ANNOTATOR, work_dir=tmp_path / "w")
    run_logits(config, "labeled", workers=0)
    other = replace(config, backend="torchscript", weights=_script(tmp_path, depth=1))
    with pytest.raises(UserError, match="backend.*--force"):
        run_logits(other, "labeled", workers=0)
    assert len(complete_ids(tmp_path / "w/logits.zarr")) == 16  # untouched
    run_logits(config, "val", workers=0)
    said = []
    assert run_logits(other, "labeled", workers=0, force=True, warn=said.append)["written"] == 16
    assert LogitsStore(tmp_path / "w/logits.zarr").attrs["backend"] == "torchscript"
    assert len(said) == 1 and said[0].startswith("--force: ") and 'backend: stored "toy" vs now "torchscript"' in said[0]
    assert said[0].endswith("its 22 images of every split are deleted; rerun `conformalsam logits` for the splits "
                            "other than labeled")  # what --force deleted, said


def test_bad_models_are_clear_errors(toy_world, tmp_path):
    config = replace(toy_config(toy_world), backend="torchscript", work_dir=tmp_path / "w")
    with pytest.raises(UserError, match="the model returns 5 channels, expected 8"):
        run_logits(replace(config, weights=_script(tmp_path, classes=5, depth=1)), "labeled", workers=0)
    with pytest.raises(UserError, match=r"train_\d+\.jpg: backend 'torchscript' produced NaN"):
        run_logits(replace(config, weights=_script(tmp_path, depth=1, out=float("nan")), work_dir=tmp_path / "n"),
                   "labeled", workers=0, force=True)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(UserError, match="not a TorchScript file"):
        run_logits(replace(config, weights=tmp_path / "junk.pt"), "labeled", workers=0)


def test_unreadable_images_are_skipped_and_listed(toy_world, tmp_path):
    import shutil

    world = tmp_path / "toy"
    shutil.copytree(toy_world, world)
    config = replace(toy_config(world), weights=ANNOTATOR, work_dir=tmp_path / "w")
    first = Dataset(config).split("labeled")[0]
    first.image.write_bytes(first.image.read_bytes()[:300])  # truncated JPEG: header fine, decode fails
    second = Dataset(config).split("labeled")[1]
    second.image.write_bytes(b"garbage")
    warnings = []
    result = run_logits(config, "labeled", workers=1, warn=warnings.append)
    assert result["written"] == 14 and result["failed"] == 2
    failed = LogitsStore(tmp_path / "w/logits.zarr").attrs["failed"]
    assert set(failed) == {first.id, second.id} and str(first.image) in failed[first.id]
    assert len(warnings) == 2


def _cli(args, env=None, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([sys.executable, str(PROJECT_ROOT / "cli.py"), "logits", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _flags(world, weights, work):
    cfg = toy_config(world)
    return ["--format", "folder", "--root", str(cfg.root), "--labeled", str(cfg.labeled), "--unlabeled",
            str(cfg.unlabeled), "--val", str(cfg.val), "--backend", "torchscript", "--weights", str(weights),
            "--work-dir", str(work), "--batch-size", "2", "--workers", "1", "--device", "cpu"]


def test_sigkill_then_rerun_equals_uninterrupted_run(toy_world, tmp_path):
    weights = _script(tmp_path)
    reference = _cli(_flags(toy_world, weights, tmp_path / "ref"))
    killed = _cli(_flags(toy_world, weights, tmp_path / "run"))
    store = tmp_path / "run" / "logits.zarr"
    deadline = time.time() + 120
    while len(complete_ids(store)) < 10 and killed.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    partial = len(complete_ids(store))
    assert 10 <= partial < 76, f"kill did not land part-way ({partial} images done)"
    assert reference.wait() == 0, reference.stdout.read()
    rerun = _cli(_flags(toy_world, weights, tmp_path / "run"))
    out = rerun.communicate()[0]
    assert rerun.returncode == 0, out
    _same_store(tmp_path / "ref/logits.zarr", store)
    assert not [p for p in (store / "scores").iterdir() if p.name.startswith(".tmp")]


def test_torchrun_two_processes_equals_single_process(toy_world, tmp_path):
    weights = _script(tmp_path, depth=2)
    single = _cli(_flags(toy_world, weights, tmp_path / "one"))
    assert single.wait() == 0, single.stdout.read()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                str(PROJECT_ROOT / "cli.py"), "logits", *_flags(toy_world, weights, tmp_path / "two")]
    proc = subprocess.run(torchrun, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _same_store(tmp_path / "one/logits.zarr", tmp_path / "two/logits.zarr")


def test_store_reads_its_own_layout_directly_and_any_other_through_zarr(tmp_path, monkeypatch):
    from pipeline.stage0.store import open_for_writing, write_scores

    path = tmp_path / "logits.zarr"
    identity = {"classes": ["a", "b", "c"], "backend": "t", "model_id": "m", "weights_sha256": "",
                "score_kind": "logits", "scale": "native"}
    open_for_writing(path, identity, force=False)
    rng = np.random.default_rng(0)
    data = rng.normal(0, 3, (3, 9, 13)).astype(np.float16)
    write_scores(path, "own", data, (36, 52))
    other = zarr.create_array(path / "scores" / "other", shape=data.shape, chunks=(1, 4, 4), dtype="float16",
                              attributes={"image_size": [36, 52]})  # several chunks, default codecs
    other[...] = data
    store = LogitsStore(path)
    assert store.ids() == ["other", "own"]
    for image_id in store.ids():
        np.testing.assert_array_equal(store.read(image_id), data.astype(np.float32))
        np.testing.assert_array_equal(store.read(image_id),
                                      zarr.open_array(path / "scores" / image_id)[...].astype(np.float32))
        assert store.image_size(image_id) == (36, 52)
    with pytest.raises(UserError, match="no scores for image 'nope'"):
        store.read("nope")
    through_zarr = []
    real = LogitsStore._array
    monkeypatch.setattr(LogitsStore, "_array", lambda self, i: through_zarr.append(i) or real(self, i))
    store.read("own"), store.read("other")
    assert through_zarr == ["other"]  # the tool's own single-chunk layout skips zarr's machinery


def test_a_finished_store_loads_no_model_and_force_loads_the_new_one_before_removing_anything(toy_world, tmp_path,
                                                                                               monkeypatch):
    import pipeline.stage0.logits as logits

    config = replace(toy_config(toy_world), weights=ANNOTATOR, work_dir=tmp_path / "w")
    first = run_logits(config, "labeled", workers=0)
    assert first["written"] == 16

    def no_model(*args, **kwargs):
        raise AssertionError("a finished store needs no model")

    with monkeypatch.context() as patch:
        patch.setattr(logits, "load_backend", no_model)
        again = run_logits(config, "labeled", workers=0)
    assert again["written"] == 0 and again["skipped"] == 16
    (tmp_path / "junk.pt").write_bytes(b"junk")
    junk = replace(config, backend="torchscript", weights=tmp_path / "junk.pt")
    with pytest.raises(UserError, match="not a TorchScript file"):
        run_logits(junk, "labeled", workers=0, force=True)
    assert len(LogitsStore(tmp_path / "w/logits.zarr")) == 16  # --force removed nothing: the model failed first


def test_stage_0_on_a_cpu_reuses_freed_memory_instead_of_faulting_in_fresh_pages(toy_world, tmp_path, monkeypatch):
    import resource
    from dataclasses import replace

    import torch

    import pipeline.stage0.logits as logits
    from conftest import ANNOTATOR, toy_config

    if logits._glibc() is None:
        pytest.skip("not glibc: its allocator settings do not apply")

    pages = 10 * 2**20 * 4 // resource.getpagesize()
    with logits.heap_reused(True):
        torch.ones(10 * 2**20)  # the heap grows once
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(20):  # a batch's activations: allocated, written, freed (40 MB, above any mmap threshold)
            torch.ones(10 * 2**20)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < 20 * pages / 2  # returned to the system, every one would fault all its pages in again
    used = []
    real = logits.heap_reused
    monkeypatch.setattr(logits, "heap_reused", lambda enabled: used.append(enabled) or real(enabled))
    config = replace(toy_config(toy_world), weights=ANNOTATOR, work_dir=tmp_path / "work")
    logits.run_logits(config, "labeled", device="cpu", workers=0, info=lambda m: None)
    assert used == [True]


def test_split_all_scores_what_calibrate_needs_before_val(toy_world, tmp_path, monkeypatch):
    """Val images named to sort before the train ones: by id alone, val would be scored first."""
    import shutil
    from dataclasses import replace
    from pathlib import Path

    import pipeline.stage0.logits as logits
    from conftest import ANNOTATOR, toy_config
    from pipeline.data.datasets import Dataset

    world = tmp_path / "toy"
    shutil.copytree(toy_world, world)
    config = replace(toy_config(world), weights=ANNOTATOR, work_dir=tmp_path / "work")
    lines = []
    for line in Path(config.val).read_text().splitlines():
        image, mask = line.split()
        for old in (image, mask):
            path = config.root / old
            path.rename(path.with_name("a" + path.name))
        lines.append(f"{Path(image).parent}/a{Path(image).name} {Path(mask).parent}/a{Path(mask).name}")
    Path(config.val).write_text("\n".join(lines) + "\n")
    order = []
    real = logits.write_scores
    monkeypatch.setattr(logits, "write_scores", lambda path, id_, *a: order.append(id_) or real(path, id_, *a))
    logits.run_logits(config, "all", batch_size=4, device="cpu", workers=0, info=lambda m: None)
    dataset = Dataset(config)
    val = {s.id for s in dataset.split("val")}
    train = {s.id for name in ("labeled", "unlabeled") for s in dataset.split(name)}
    assert set(order) == val | train and max(val) < min(train)
    first_val = min(i for i, id_ in enumerate(order) if id_ in val)
    assert set(order[:first_val]) == train  # every labeled and unlabeled image before any val image
