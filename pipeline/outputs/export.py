"""`conformalsam export`: the filtered masks as supervision for other code bases, without touching the
user's data set.

``unimatch`` (UniMatch, AllSpark and the code bases built on UniMatch's `SemiDataset`): split files whose
lines are ``<image> <mask>``, split on one space and joined to the config's ``data_root``. Image paths
are relative to the data root, exactly as in the user's lists; mask paths are absolute (``os.path.join``
drops the root before an absolute path), so the masks can live in the export folder::

    DIR/labeled.txt     the ground truth lines, repeated r = round(U / L) times, then every unlabeled image
                        with its filtered mask (255 = ignore): N = r L + U lines
    DIR/unlabeled.txt   the U unlabeled images cycled to N lines; the second field is the filtered mask,
                        which UniMatch's reader opens for its size only
    DIR/masks/<id>.png  the filtered masks (copies of <work>/masks)
    DIR/labels/<id>.png the ground truth as class ids + 255, for formats whose files are not (camvid, ade20k)
    DIR/val.txt         the val split in the same form (converted labels in DIR/val-labels/), to replace
                        UniMatch's own splits/<dataset>/val.txt, which its SemiDataset always reads

Why the repeats: UniMatch cuts its labeled list to as many lines as the unlabeled list has
(``nsample``), keeping the first ones. Equal lengths keep every line, and the labeled stream then learns
ground truth and filtered masks about half and half, as stage I weighs them at lambda = 0.5; one UniMatch
epoch is N / U passes over the unlabeled images.

``list``: ``DIR/pseudo.txt``, one ``<absolute image> <absolute mask>`` line per unlabeled image, and
``DIR/masks/``: for any code that reads image/label pairs.

The folder is built beside DIR and renamed into place: an interrupted export leaves no half folder.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from pipeline.atomic import write_text_atomic
from pipeline.config import Config
from pipeline.data.datasets import Dataset, Sample
from pipeline.errors import UserError
from pipeline.labels import write_palette_png
from pipeline.stage1.record import MASKS, cached_masks

TARGETS = ("unimatch", "list")
NATIVE_LABELS = ("voc", "folder")  # mask files that already hold class ids and 255


def export(config: Config, target: str, out: Path, force: bool = False, warn=print) -> dict:
    if target not in TARGETS:
        raise UserError(f"--to {target}: choose one of {', '.join(TARGETS)}")
    out = Path(out).absolute()
    _safe_destination(out, config, force)
    dataset = Dataset(config)
    unlabeled, _, missing = cached_masks(config.work_dir, dataset.split("unlabeled"), True, "")
    if not unlabeled:
        raise UserError(f"{config.work_dir / MASKS}: no filtered mask for any unlabeled image; run `conformalsam "
                        "calibrate` first")
    if missing:
        warn(f"{missing} unlabeled images have no filtered mask (stage 0 could not read them): left out")
    labeled = dataset.split("labeled") if target == "unimatch" else []
    root = Path(config.root).absolute()

    staging = out.parent / f".{out.name}.export-{os.getpid()}"
    try:
        shutil.rmtree(staging, ignore_errors=True)
        (staging / "masks").mkdir(parents=True)
        for sample in unlabeled:
            shutil.copyfile(config.work_dir / MASKS / f"{sample.id}.png", staging / "masks" / f"{sample.id}.png")
        pseudo = [(s.image.absolute() if target == "list" else _relative(s.image, root), out / "masks" / f"{s.id}.png")
                  for s in unlabeled]
        if target == "list":
            lines = {"pseudo.txt": pseudo}
        else:
            gt = [(_relative(s.image, root), _ground_truth(dataset, s, root, staging, out)) for s in labeled]
            repeats = max(1, round(len(unlabeled) / len(gt)))
            labeled_lines = gt * repeats + pseudo
            lines = {"labeled.txt": labeled_lines,
                     "unlabeled.txt": [pseudo[i % len(pseudo)] for i in range(len(labeled_lines))]}
            if config.val is not None and Path(config.val).is_file():
                lines["val.txt"] = [(_relative(s.image, root), _ground_truth(dataset, s, root, staging, out,
                                                                             "val-labels")) for s in dataset.split("val")]
        _no_spaces([str(p) for content in lines.values() for pair in content for p in pair])
        for name, content in lines.items():
            write_text_atomic(staging / name, "".join(f"{image} {mask}\n" for image, mask in content))
        _install(staging, out)
    except OSError as exc:
        raise UserError(f"{out}: export failed ({exc.strerror or type(exc).__name__}: "
                        f"{exc.filename or ''}); nothing was changed there") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"out": out, "files": sorted(lines), "labeled": len(labeled), "unlabeled": len(unlabeled),
            "missing": missing, "lines": len(next(iter(lines.values())))}


def _safe_destination(out: Path, config: Config, force: bool) -> None:
    """Refuse a folder that is, holds or lies inside the data set or the work folder (--force replaces the
    whole folder), and an existing one without --force."""
    for what, folder in (("the data set (data.root)", config.root), ("the work folder", config.work_dir)):
        folder = Path(folder).absolute()
        if out == folder or folder.is_relative_to(out) or out.is_relative_to(folder):
            raise UserError(f"{out}: is, holds or lies inside {what} {folder}; export to a folder of its own")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: is a file; give a folder to export into")
    if out.exists() and not force:
        raise UserError(f"{out} exists: pass --force to replace it, or choose another folder")


def _ground_truth(dataset: Dataset, sample: Sample, root: Path, staging: Path, out: Path,
                  folder: str = "labels") -> str:
    """A ground-truth mask's path in the line: the user's own file when it already holds class ids and 255,
    else a converted copy under DIR/<folder>/ (ids of different splits may coincide: one folder each)."""
    if dataset.format in NATIVE_LABELS:
        dataset.read_mask(sample.mask)  # values checked: class ids and 255 only
        return _relative(sample.mask, root)
    (staging / folder).mkdir(exist_ok=True)
    write_palette_png(staging / folder / f"{sample.id}.png", dataset.read_mask(sample.mask))
    return str(out / folder / f"{sample.id}.png")


def _relative(path: Path, root: Path) -> str:
    """Relative to the data root when inside it (as UniMatch's own lists), else absolute."""
    path = Path(path).absolute()
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _no_spaces(paths: list[str]) -> None:
    spaced = next((p for p in paths if any(c.isspace() for c in p)), None)
    if spaced is not None:
        raise UserError(f"{spaced}: a path with a space cannot be written in a split file (its lines are split "
                        "on spaces); rename it or export to a folder without spaces")


def _install(staging: Path, out: Path) -> None:
    if not out.exists():
        os.replace(staging, out)
        return
    retired = out.parent / f".{out.name}.old-{os.getpid()}"
    os.replace(out, retired)
    try:
        os.replace(staging, out)
    except OSError:
        os.replace(retired, out)  # the old export back in place
        raise
    shutil.rmtree(retired, ignore_errors=True)
