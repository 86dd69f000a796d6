"""Stage 0: score every image of the chosen splits with the foundation model into the store.

Data path: a batch plan is made once from image headers (images of equal model-input size share a
batch, so nothing is padded and a batch's content never depends on what is already done); loader
workers decode and preprocess whole batches; the model runs in the main process; writer threads
compress and write each image's array. Under `torchrun` every rank takes every world-size-th batch of
the same plan and writes its own arrays: same store as one process, no coordinator.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline import distributed
from pipeline.atomic import ensure_writable
from pipeline.locks import locked
from pipeline.backends import Backend, Preprocess, load_backend, resolve_backend
from pipeline.data.classmap import ClassMap, unmapped
from pipeline.config import Config
from pipeline.data.datasets import SPLITS, Dataset, Sample, image_size, read_image
from pipeline.errors import DataProblem, UserError
from pipeline.parallel import thread_map
from pipeline.stage0.store import (DEFAULT_ENCODING, ENCODINGS, UINT8_CODE, check_identity, encode, existing_format,
                                   holds, intact_ids, known_code, open_for_writing, record_failures, write_scores)


@dataclass(frozen=True)
class Item:
    sample: Sample
    size: tuple[int, int]  # original (H, W)


def select_samples(dataset: Dataset, split: str) -> tuple[list[Sample], frozenset[str]]:
    """The split's samples, and the ids to score last. ``all`` = labeled + unlabeled + val (when configured),
    each id once; val's own ids come last, after what calibrate needs (an interrupted run has scored that)."""
    names = [s for s in SPLITS if s != "val" or dataset.config.val is not None] if split == "all" else [split]
    if split != "all" and split not in SPLITS:
        raise UserError(f"--split {split}: choose labeled, unlabeled, val or all")
    unique: dict[str, Sample] = {}
    later = set()
    for name in names:
        for sample in dataset.split(name):
            if sample.id not in unique:
                unique[sample.id] = sample
                if name == "val":
                    later.add(sample.id)
    return list(unique.values()), frozenset(later)


def plan_batches(items: list[Item], preprocess: Preprocess, batch_size: int,
                 later: frozenset[str] = frozenset()) -> list[list[Item]]:
    """Batches of images with equal model-input size, in a fixed order (by first id); the ids in ``later``
    in batches of their own after all the others."""
    return (_batches([it for it in items if it.sample.id not in later], preprocess, batch_size)
            + _batches([it for it in items if it.sample.id in later], preprocess, batch_size))


def _batches(items: list[Item], preprocess: Preprocess, batch_size: int) -> list[list[Item]]:
    groups: dict[tuple[int, int], list[Item]] = defaultdict(list)
    for item in sorted(items, key=lambda it: it.sample.id):
        groups[preprocess.size(*item.size)].append(item)
    batches = [g[i : i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]
    return sorted(batches, key=lambda b: b[0].sample.id)


def _header(sample: Sample):
    try:
        return Item(sample, image_size(sample.image)), None
    except DataProblem as problem:
        return None, (sample.id, str(problem))


class BatchLoader(torch.utils.data.Dataset):
    """Decodes and preprocesses one planned batch per item (in loader worker processes)."""

    def __init__(self, batches: list[list[Item]], preprocess: Preprocess):
        self.batches, self.preprocess = batches, preprocess

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int):
        items, tensors, failed = [], [], {}
        for item in self.batches[index]:
            try:
                image = read_image(item.sample.image)
            except DataProblem as problem:
                failed[item.sample.id] = str(problem)
                continue
            items.append(item)
            tensors.append(self.preprocess(image))
        return items, (torch.stack(tensors) if tensors else None), failed


def resolve_device(name: str | None) -> torch.device:
    """The device named (auto: CUDA when present), with its index: 'cuda' is the current CUDA device."""
    if name in (None, "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device name (cpu, cuda, cuda:1, auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


@locked("logits", lambda **_: (["scores"], []))
def run_logits(config: Config, split: str = "all", batch_size: int = 8, device: str | None = None,
               force: bool = False, workers: int | None = None, scale: float | None = None,
               progress=None, warn=print, info=print, verify: bool = False, encoding: str | None = None) -> dict:
    """Fill ``<work>/logits.zarr`` for a split; returns counts (written, skipped, failed). Images already
    there are skipped unless damaged (`store.intact_ids`; ``verify``: every chunk read and checked).
    ``encoding`` (`store.ENCODINGS`): by default an existing store's (it is being completed), else uint8."""
    if encoding is not None and encoding not in ENCODINGS:
        raise UserError(f"--encoding {encoding}: choose {' or '.join(ENCODINGS)}")
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be at least 1")
    if scale is not None and not 0 < scale <= 1:
        raise UserError(f"--scale {scale}: must be in (0, 1] (a fraction of the image size)")
    dataset = Dataset(config)
    samples, later = select_samples(dataset, split)
    rank, world = distributed.setup()
    dev = resolve_device(device) if world == 1 or device not in (None, "auto") else distributed.local_device()
    cls, mapping, weights = resolve_backend(config, dataset.classes)
    model_id, weights_sha256 = cls.fingerprint(weights, config)
    path = config.work_dir / "logits.zarr"
    stored = existing_format(path) if not force else None  # a store being completed keeps its format
    encoding = encoding or (stored[0] if stored else DEFAULT_ENCODING)
    code = known_code(path, (stored[1] if stored and stored[0] == encoding else UINT8_CODE)
                      if encoding == "uint8" else None)  # checked before a model is loaded
    identity = {"classes": list(dataset.classes), "backend": cls.name, "model_id": model_id,
                "weights_sha256": weights_sha256,
                "score_kind": mapping.score_kind(cls.score_kind) if encoding == "float16" else "probabilities",
                "scale": "native" if scale is None else scale, "class_map": mapping.describe(dataset.classes),
                "encoding": encoding, "uint8_code": code}
    if not force and (path / "zarr.json").is_file():
        check_identity(path, identity)  # refused before a model is loaded (SEEM takes a minute)
    if holds(path, identity, [s.id for s in samples], verify):  # finished: no model to load
        return {"written": 0, "skipped": len(samples), "failed": 0, "images": len(samples), "store": path,
                "rank": rank, "world": world}
    if rank == 0:  # before a model is loaded
        ensure_writable(config.work_dir, "choose another --work-dir, or fix the folder's permissions")
    backend = load_backend(cls, mapping, weights, dev, config)  # before --force may remove an old store
    if rank == 0:
        for note in backend.notes:
            info(note)
        for warning in backend.warnings:
            warn(warning)
        for name in unmapped(dataset.classes, mapping):
            warn(f"class '{name}' has no model output (foundation.map / foundation.outputs): its scores are zero")
        if deleted := open_for_writing(path, identity, force):
            rerun = "" if split == "all" else f"; rerun `conformalsam logits` for the splits other than {split}"
            warn(f"--force: {path} was made with other settings ({'; '.join(deleted[:-1])}): its {deleted[-1]} "
                 f"of every split are deleted{rerun}")
    distributed.barrier()
    if rank != 0:  # rank 0 created or validated it; only check (cleaning up here could hit its writes)
        check_identity(path, identity)
    done = set(intact_ids(path, verify))
    headers = thread_map(_header, samples, 8)
    unreadable = dict(f for _, f in headers if f is not None)  # every rank sees these: rank 0 reports
    batches = plan_batches([it for it, _ in headers if it is not None], backend.preprocess, batch_size, later)
    mine = batches[rank::world]
    todo = [b for b in mine if not all(it.sample.id in done for it in b)]
    skipped = sum(len(b) for b in mine) - sum(len(b) for b in todo)
    undecodable: dict[str, str] = {}  # found by this rank's loader
    with heap_reused(dev.type == "cpu"):
        written = _score(backend, mapping, todo, done, path, dev, scale, (encoding, code), workers, progress, undecodable,
                         skipped, sum(map(len, mine)))
    for reason in sorted({**(unreadable if rank == 0 else {}), **undecodable}.values()):
        warn(f"skipped unreadable image: {reason}")
    all_failed = {**unreadable, **distributed.gather_dicts(undecodable)}
    if rank == 0:
        record_failures(path, all_failed)
    distributed.barrier()
    return {"written": written, "skipped": skipped, "failed": len(all_failed), "images": len(samples),
            "store": path, "rank": rank, "world": world}


@contextlib.contextmanager
def heap_reused(enabled: bool):
    """On a CPU, keep freed memory for the next batch. glibc hands every block above its mmap threshold back
    to the system when it is freed, so each batch's activations are fresh pages the kernel must fault in and
    zero: measured, that was a third of stage 0's CPU time (159 M minor page faults for 335 CamVid images).
    With mmap off and no trimming while scoring, the next batch reuses the same memory; the defaults come
    back afterwards and the heap is trimmed. glibc only; elsewhere nothing changes."""
    libc = _glibc() if enabled else None
    if libc is None:
        yield
        return
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_MAX, 65536)  # glibc's defaults
        libc.mallopt(M_TRIM_THRESHOLD, 128 * 1024)
        libc.malloc_trim(0)


def _glibc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def _score(backend: Backend, mapping: ClassMap, todo, done, path, device, scale, fmt, workers, progress, failed,
           skipped, total) -> int:
    if workers is None:
        workers = min(8, max(1, (os.cpu_count() or 2) - 1))
    loader = torch.utils.data.DataLoader(
        BatchLoader(todo, backend.preprocess), batch_size=None, shuffle=False, num_workers=workers,
        pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None,
        persistent_workers=False, multiprocessing_context="spawn" if workers and device.type == "cuda" else None)
    if progress is not None:
        progress(skipped, total)
    written, pending = 0, []
    with ThreadPoolExecutor(max_workers=3) as writers:
        for items, batch, bad in loader:
            failed.update(bad)
            if batch is not None:
                scores = _predict(backend, mapping, batch.to(device, non_blocking=True), items, scale, fmt)
                for item, image_scores in zip(items, scores):
                    if item.sample.id not in done:
                        pending.append(writers.submit(write_scores, path, item.sample.id, image_scores, item.size))
                        written += 1
            pending = _settle(pending, limit=64)
            if progress is not None:
                progress(len(items) + len(bad), total)
        for future in pending:
            future.result()
    return written


def _settle(pending: list, limit: int) -> list:
    """Drop finished writes (re-raising their errors); wait for the oldest while too many are queued."""
    while len(pending) > limit:
        pending.pop(0).result()
    for future in [f for f in pending if f.done()]:
        future.result()
        pending.remove(future)
    return pending


def _predict(backend: Backend, mapping: ClassMap, batch: torch.Tensor, items: list[Item], scale: float | None,
             fmt: tuple[str, str | None]):
    """Each image's encoded scores; ``fmt``: (encoding, uint8 code)."""
    encoding, code = fmt
    with torch.autocast("cuda", dtype=torch.float16, enabled=backend.autocast and batch.is_cuda):
        scores = backend.predict(batch)
    scores = mapping.apply(scores.float(), backend.score_kind)
    finite = torch.isfinite(scores).flatten(1).all(1)
    if not finite.all():
        bad = items[int((~finite).nonzero()[0])].sample.image
        raise UserError(f"{bad}: backend '{backend.name}' produced NaN/inf scores for this image")
    kind = mapping.score_kind(backend.score_kind)
    out = []
    for item, image_scores in zip(items, scores):
        if scale is not None:
            size = (max(1, round(item.size[0] * scale)), max(1, round(item.size[1] * scale)))
            image_scores = F.interpolate(image_scores[None], size=size, mode="bilinear", align_corners=False)[0]
        if encoding == "float16":
            image_scores = _fp16_range(image_scores, kind, item.sample.image)
        out.append(encode(image_scores, kind, encoding, code))
    return out


FP16_MAX = 65504.0


def _fp16_range(scores: torch.Tensor, kind: str, image) -> torch.Tensor:
    """Scores the float16 store can hold. Logits beyond its range are shifted per pixel by their maximum
    (softmax and argmax unchanged) and floored at -65504 (where exp() is 0 either way); other score kinds
    cannot be moved, so they are refused naming the image."""
    if scores.abs().amax() <= FP16_MAX:
        return scores
    if kind == "logits":
        return (scores - scores.amax(0, keepdim=True)).clamp_min(-FP16_MAX)
    raise UserError(f"{image}: scores up to {float(scores.abs().amax()):.3g} exceed float16's range ({FP16_MAX:g}), "
                    f"in which the store keeps {kind}; scale them down in the model")
