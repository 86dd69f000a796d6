"""The score store (`work/logits.zarr`): one compressed array per image, readable with plain zarr.

Layout (zarr v3, local folder)::

    logits.zarr/                 group; attrs: classes, backend, model_id, weights_sha256, score_kind,
                                 scale, class_map (class -> model outputs summed; null: one each),
                                 encoding, decode, created, tool_version, failed (images that could not be read)
    logits.zarr/scores/<id>      (K, h, w), one chunk; attrs: image_size [H, W], chunk_bytes, chunk_crc32

Two encodings (`logits --encoding`):

- ``uint8`` (the default): 8-bit class probabilities, blosc-zstd level 5. Value v stands for the probabilities
  in [edges[v-1], edges[v]) and decodes to the middle of that range (the attribute ``levels``; 0 for v = 0).
  The edges are values of stage 1's score grid (`conformal.to_bins`), the only places a threshold can be: a
  threshold at an edge splits the stored probabilities exactly where it splits the unstored ones. They follow
  the power curve (v / 255) ** 1.5, which spends the 256 values where conformal thresholds fall (a per-class
  threshold can sit near 0.001): up to p = 0.0024 every grid step (2^-11) is an edge, above it one edge every one
  to ten steps below p = 0.5 (where the grid's steps shrink, more). Probabilities under the first step, which no threshold can tell from 0, are stored as 0 and
  compress to almost nothing (`make bench-scale`, docs/annotators.md). score_kind is then always
  ``probabilities``. The attribute ``uint8_code`` names this code, ``grid-1.5``; uint8 stores written before
  it have no such attribute and hold the plain power code, probability = (value / 255) ** 1.5, which they
  keep (read and completed with it).
- ``float16``: the scores as the model gave them (logits, probabilities or SEEM's scores), blosc-zstd with byte
  shuffle. Stores written before encodings existed are of this kind (no ``encoding`` attribute).

Conformal prediction stays valid on either: stage 1 fits its thresholds on exactly the probabilities it writes
the masks from.

An image's array is written under a temporary name and renamed into place, so an array that exists
under its id is complete: a killed run loses at most the images in flight, and a rerun skips the rest.

Damage (a chunk deleted, truncated or overwritten later, scores that are not finite) is found where it
costs little: every read checks the chunk's size and CRC-32 (recorded at write; about 1% of a read) and
that the scores are finite, and refuses a damaged image in one line. A `logits` rerun rebuilds the
images whose chunk is missing or of the wrong size (a stat per image); `logits --verify` also checks every
CRC and value, for damage that keeps the size.

    >>> import numpy as np, zarr; store = zarr.open_group("work/logits.zarr")
    >>> v = store["scores/2007_000032"][:]                                  # (K, h, w) uint8
    >>> p = np.take(np.float32(store.attrs["levels"]), v)                   # probabilities
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import zarr
from numcodecs import blosc
from zarr.codecs import BloscCodec

from pipeline import __version__
from pipeline.errors import UserError, describe
from pipeline.stage1.conformal import grid_values, nonconformity

SCORE_KINDS = ("logits", "probabilities", "scores")  # scores: non-negative, unnormalised (SEEM's sem_seg)
SCORES = "scores"
TMP_PREFIX = ".tmp-"
ENCODINGS = ("uint8", "float16")
DEFAULT_ENCODING = "uint8"
UINT8_CODE, LEGACY_CODE = "grid-1.5", "power-1.5"
DECODE = {"uint8": "probability = levels[value] (the attribute levels)", "float16": "scores of score_kind, as stored"}
CODECS = {"float16": BloscCodec(cname="zstd", clevel=3, shuffle="shuffle", typesize=2),
          "uint8": BloscCodec(cname="zstd", clevel=5, shuffle="noshuffle", typesize=1)}
# Attributes that must match for a store to be reused; the rest describe the run.
IDENTITY = ("classes", "backend", "model_id", "weights_sha256", "score_kind", "scale", "class_map", "encoding",
            "uint8_code")


@dataclass(frozen=True)
class Code:
    """An 8-bit code: value v holds the probabilities in [edges[v-1], edges[v]) and stands for levels[v]."""

    name: str
    edges: np.ndarray  # float64 (255,), increasing
    levels: np.ndarray  # float32 (256,)


def _power_levels() -> np.ndarray:
    return (np.arange(256) / 255.0) ** 1.5


@lru_cache(maxsize=None)
def uint8_code(name: str) -> Code:
    """``grid-1.5`` (new stores) or ``power-1.5`` (uint8 stores written before codes were named: the nearest of
    the levels (v / 255) ** 1.5; completed here through `encode`'s fp32 comparison, which can put a probability
    within about 1e-7 of a midpoint one value up from where that version put it)."""
    if name == LEGACY_CODE:
        levels = _power_levels()
        return Code(name, (levels[1:] + levels[:-1]) / 2, levels.astype(np.float32))
    if name != UINT8_CODE:
        raise ValueError(f"unknown uint8 code {name!r}")
    grid = (1 - grid_values().double()).flip(0).numpy()  # every probability a threshold can admit from, increasing
    power = _power_levels()
    target = (power[1:] + power[:-1]) / 2  # the power code's edges ...
    above = np.searchsorted(grid, target)
    nearest = np.where(grid[above] - target < target - grid[above - 1], above, above - 1)  # ... moved onto the grid
    edges, i = np.empty(255), 0
    for v in range(255):
        i = max(int(nearest[v]), i + 1)  # at least one grid step above the edge below
        edges[v] = grid[i]
    bounds = np.concatenate([[0.0], edges, [1.0]])
    levels = (bounds[1:] + bounds[:-1]) / 2
    levels[0] = 0.0
    return Code(name, edges, levels.astype(np.float32))


def stored_encoding(attrs: dict) -> str:
    """A store's encoding; stores from before encodings existed hold float16."""
    return attrs.get("encoding", "float16")


def stored_code(attrs: dict) -> str | None:
    """A uint8 store's code (None for float16)."""
    return attrs.get("uint8_code", LEGACY_CODE) if stored_encoding(attrs) == "uint8" else None


def known_code(path: Path, code: str | None) -> str | None:
    """``code``, the uint8 code of the store at ``path`` (None: float16), if this version reads it; else a one-line
    error."""
    if code not in (None, UINT8_CODE, LEGACY_CODE):
        raise UserError(f"{path}: its uint8_code '{code}' is newer than this conformalsam ({__version__}), which "
                        f"reads {UINT8_CODE} and {LEGACY_CODE}; update conformalsam, or rebuild the store with "
                        "`conformalsam logits --force`")
    return code


def existing_format(path: Path) -> tuple[str, str | None] | None:
    """(encoding, uint8 code) of the store at ``path``, if there is one (an unreadable one: None,
    `check_identity` says why)."""
    try:
        if not (path / "zarr.json").is_file():
            return None
        attrs = dict(zarr.open_group(path, mode="r").attrs)
        return stored_encoding(attrs), stored_code(attrs)
    except Exception:
        return None


def encode(scores: torch.Tensor, kind: str, encoding: str, code: str = UINT8_CODE) -> np.ndarray:
    """The array the store keeps for (K, h, w) scores of ``kind``: float16 as given, or uint8 probabilities in
    ``code`` (on the scores' device). A probability's value is found from its score 1 - p as stage 1 computes
    it, so stage 1's comparison with a threshold at an edge is the same before and after encoding."""
    if encoding == "float16":
        return scores.half().cpu().numpy()
    s = nonconformity(to_probabilities(scores, kind).float())
    above = torch.from_numpy(np.ascontiguousarray(1 - uint8_code(code).edges[::-1])).float().to(s.device)
    return (255 - torch.bucketize(s, above)).to(torch.uint8).cpu().numpy()  # edges e with s <= 1 - e


def to_probabilities(scores: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-pixel class probabilities (K, ...) from stored scores of the given kind."""
    scores = scores.float()
    if kind == "logits":
        return scores.softmax(0)
    if kind == "scores":  # SEEM: sum_q p_q(k) sigmoid(m_q): normalise over classes
        return scores.clamp_min(0) / scores.clamp_min(0).sum(0, keepdim=True).clamp_min(1e-6)
    if kind == "probabilities":
        return scores
    raise ValueError(f"unknown score kind {kind!r}")


class LogitsStore:
    """Read access to a score store. ``read(id)`` -> float32 (K, h, w) as stored."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / "zarr.json").is_file():
            raise UserError(f"{self.path}: no score store here (run `conformalsam logits` first)")
        self.group = zarr.open_group(self.path, mode="r")
        self.attrs = dict(self.group.attrs)

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.attrs["classes"])

    @property
    def score_kind(self) -> str:
        return self.attrs["score_kind"]

    def ids(self) -> list[str]:
        return complete_ids(self.path)

    def __len__(self) -> int:
        return len(self.ids())

    def __contains__(self, image_id: str) -> bool:
        return (self.path / SCORES / image_id / "zarr.json").is_file()

    def __iter__(self):
        for image_id in self.ids():
            yield image_id, self.read(image_id)

    def _array(self, image_id: str) -> zarr.Array:
        if image_id not in self:
            raise UserError(f"{self.path}: no scores for image '{image_id}' (rerun `conformalsam logits`)")
        return zarr.open_array(self.path / SCORES / image_id, mode="r")

    def _meta(self, image_id: str) -> dict:
        try:
            return json.loads((self.path / SCORES / image_id / "zarr.json").read_text())
        except FileNotFoundError:
            raise UserError(f"{self.path}: no scores for image '{image_id}' (rerun `conformalsam logits`)") from None

    @property
    def encoding(self) -> str:
        return stored_encoding(self.attrs)

    @property
    def levels(self) -> np.ndarray:
        """float32 (256,): the probability each value of a uint8 store stands for."""
        return uint8_code(known_code(self.path, stored_code(self.attrs))).levels

    def read(self, image_id: str) -> np.ndarray:
        """float32 (K, h, w) scores (uint8 arrays: their probabilities). Arrays in the layout this tool writes are
        decoded straight from their one chunk file (3x faster than going through zarr's machinery); any other
        layout is read through zarr. A damaged image is a one-line error saying how to rebuild it."""
        meta = self._meta(image_id)
        try:
            if _single_blosc_chunk(meta):
                data = _decode_chunk(self.path / SCORES / image_id, meta)
            else:
                data = self._array(image_id)[...]
        except UserError:
            raise
        except Exception as exc:
            raise Damaged(self.path, image_id, describe(exc)) from None
        if data.dtype == np.uint8:
            return np.take(self.levels, data)  # 2x faster than levels[data]
        data = data.astype(np.float32)
        if not np.isfinite(data).all():  # on float32: 10x faster than on float16
            raise Damaged(self.path, image_id, "scores that are not finite")
        return data

    def image_size(self, image_id: str) -> tuple[int, int]:
        return tuple(self._meta(image_id)["attributes"]["image_size"])

    def probabilities(self, image_id: str) -> torch.Tensor:
        return to_probabilities(torch.from_numpy(self.read(image_id)), self.score_kind)


class Damaged(UserError):
    def __init__(self, path: Path, image_id: str, why: str):
        super().__init__(f"{path}: the scores of image '{image_id}' are damaged ({why}); rerun `conformalsam "
                         "logits --verify` with the same --split: it rebuilds damaged images")


CHUNK = ("c", "0", "0", "0")  # the one chunk file of a (K, h, w) array


def _decode_chunk(folder: Path, meta: dict) -> np.ndarray:
    """The chunk's values, after its size and CRC-32 are checked against the record (when there is one) and
    its blosc header against the array's shape: corrupt bytes never reach the decompressor."""
    raw = folder.joinpath(*CHUNK).read_bytes()
    attrs = meta.get("attributes", {})
    if "chunk_crc32" in attrs and (len(raw) != attrs["chunk_bytes"] or zlib.crc32(raw) != attrs["chunk_crc32"]):
        raise ValueError(f"chunk of {len(raw)} bytes does not match its recorded size and CRC-32")
    dtype = np.dtype(DTYPES[meta["data_type"]])
    expected = dtype.itemsize * int(np.prod(meta["shape"]))
    if len(raw) < 16 or blosc._cbuffer_sizes(raw)[:2] != (expected, len(raw)):
        raise ValueError("chunk header does not match the array")
    return np.frombuffer(blosc.decompress(raw), dtype=dtype).reshape(meta["shape"])


def intact_ids(path: Path, verify: bool = False) -> list[str]:
    """The complete ids whose chunk is there at its recorded size; with ``verify`` also its CRC-32 and
    finite values (every chunk read: seconds per thousand images)."""
    folder = Path(path) / SCORES
    intact = []
    for image_id in complete_ids(path):
        try:
            meta = json.loads((folder / image_id / "zarr.json").read_text())
            recorded = meta.get("attributes", {}).get("chunk_bytes")
            if recorded is not None and folder.joinpath(image_id, *CHUNK).stat().st_size != recorded:
                continue
            if verify and _single_blosc_chunk(meta) and not np.isfinite(
                    _decode_chunk(folder / image_id, meta).astype(np.float32)).all():  # uint8: the CRC check
                continue
        except Exception:  # unreadable metadata, a missing chunk, a bad CRC: to be rebuilt
            continue
        intact.append(image_id)
    return intact


DTYPES = {"float16": "<f2", "uint8": "u1"}


def _single_blosc_chunk(meta: dict) -> bool:
    codecs = [c.get("name") for c in meta.get("codecs", [])]
    return (meta.get("data_type") in DTYPES and codecs == ["bytes", "blosc"]
            and meta["codecs"][0].get("configuration", {}).get("endian", "little") == "little"  # none for bytes
            and meta.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape") == meta.get("shape")
            and meta.get("chunk_key_encoding") == {"name": "default", "configuration": {"separator": "/"}}
            and len(meta.get("shape", [])) == 3)


def complete_ids(path: Path) -> list[str]:
    folder = Path(path) / SCORES
    if not folder.is_dir():
        return []
    return sorted(n for n in os.listdir(folder) if not n.startswith(TMP_PREFIX) and (folder / n / "zarr.json").is_file())


def open_for_writing(path: Path, identity: dict, force: bool) -> list[str]:
    """Create the store, or check that an existing one was made by the same model for the same classes.

    ``force`` deletes a mismatching store: returns what differed (empty when nothing was deleted). Leftovers
    of killed runs (temporary arrays) are removed.
    """
    path, identity = Path(path), _spelled_out(identity)
    if (path / "zarr.json").is_file():
        differences = _differences(path, identity)
        if not force or not differences:
            check_identity(path, identity)
            _remove_leftovers(path)
            return []
        differences.append(f"{len(complete_ids(path))} images")
        shutil.rmtree(path)
    elif path.exists() and any(path.iterdir()):
        raise UserError(f"{path}: exists and is not a score store; remove it or choose another --work-dir")
    else:
        differences = []
    tmp = path.with_name(path.name + TMP_PREFIX.rstrip("-") + f"-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    group = zarr.open_group(tmp, mode="w")
    group.create_group(SCORES)
    levels = {"levels": uint8_code(identity["uint8_code"]).levels.tolist()} if identity["uint8_code"] else {}
    group.attrs.update({**identity, **levels, "decode": DECODE[identity["encoding"]], "created": _now(),
                        "tool_version": __version__, "failed": {}})
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.rmdir()
    os.replace(tmp, path)  # the group appears complete or not at all
    return differences


def holds(path: Path, identity: dict, ids: list[str], verify: bool = False) -> bool:
    """The store exists, was made with these settings, and has every one of these images intact
    (`intact_ids`; read-only)."""
    if not (Path(path) / "zarr.json").is_file() or _differences(path, identity):
        return False
    done = set(intact_ids(path, verify))
    return all(i in done for i in ids)


def _spelled_out(identity: dict) -> dict:
    """``identity`` with its encoding and uint8 code (a new uint8 store's is the current code) given."""
    encoding = stored_encoding(identity)
    return {**identity, "encoding": encoding,
            "uint8_code": identity.get("uint8_code", UINT8_CODE) if encoding == "uint8" else None}


def _differences(path: Path, identity: dict) -> list[str]:
    attrs = dict(zarr.open_group(path, mode="r").attrs)
    attrs.update(encoding=stored_encoding(attrs), uint8_code=stored_code(attrs))
    identity = _spelled_out(identity)
    return [f"{k}: stored {_short(attrs.get(k), identity.get(k))} vs now {_short(identity.get(k), attrs.get(k))}"
            for k in IDENTITY if attrs.get(k) != identity.get(k)]


def check_identity(path: Path, identity: dict) -> None:
    """Refuse a store made by another model, class list or setting (read-only: safe while others write)."""
    diff = _differences(path, identity)
    if diff:
        raise UserError(f"{path}: store was made with other settings ({'; '.join(diff)}); pass --force to rebuild "
                        "it or choose another --work-dir")


def _remove_leftovers(path: Path) -> None:
    folder = path / SCORES
    for name in os.listdir(folder):
        if name.startswith(TMP_PREFIX):
            shutil.rmtree(folder / name, ignore_errors=True)


def write_scores(path: Path, image_id: str, scores: np.ndarray, image_size: tuple[int, int]) -> None:
    """Write one image's encoded (K, h, w) array (`encode`: float16 or uint8) under a temporary name, then rename
    it into place."""
    folder = Path(path) / SCORES
    tmp = folder / f"{TMP_PREFIX}{image_id}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    data = np.ascontiguousarray(scores)
    encoding = "uint8" if data.dtype == np.uint8 else "float16"
    data = data.astype(np.float16, copy=False) if encoding == "float16" else data
    array = zarr.create_array(tmp, shape=data.shape, chunks=data.shape, dtype=encoding,
                              compressors=CODECS[encoding], fill_value=0, attributes={"image_size": list(image_size)})
    array[...] = data
    raw = tmp.joinpath(*CHUNK).read_bytes()  # just written: from the page cache
    array.attrs.update({"chunk_bytes": len(raw), "chunk_crc32": zlib.crc32(raw)})
    final = folder / image_id
    if final.exists():  # a rerun of a partial batch: replace the old copy
        shutil.rmtree(final)
    os.replace(tmp, final)


def record_failures(path: Path, failed: dict[str, str]) -> None:
    """Add unreadable images (id -> reason) to the store's attributes."""
    if not failed:
        return
    group = zarr.open_group(path, mode="r+")
    group.attrs["failed"] = {**dict(group.attrs.get("failed", {})), **failed}


def file_sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _short(value, other=None) -> str:
    """``value`` as JSON, at most about 60 characters, from just before where it differs from ``other``."""
    text, against = json.dumps(value), json.dumps(other)
    start = next((i for i, (a, b) in enumerate(zip(text, against)) if a != b), min(len(text), len(against)))
    start = max(0, start - 10) if start > 20 else 0
    text = ("..." if start else "") + text[start:]
    return text if len(text) <= 60 else text[:57] + "..."


def _now() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="seconds")
