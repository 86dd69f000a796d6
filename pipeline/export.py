"""`conformalsam export`: the filtered masks as supervision for other code bases, without touching the
user's data set.

``unimatch`` (UniMatch, AllSpark and the code bases built on UniMatch's `SemiDataset`): split files whose
lines are ``<image> <mask>``, split on one space and joined to the config's ``data_root``. Image paths
are relative to the data root, exactly as in the user's lists; mask paths are absolute (``os.path.join``
drops the root before an absolute path), so the masks can live in the export folder::

    DIR/labeled.txt     the labeled images with their ground truth, then every unlabeled image with its
                        filtered mask (255 = ignore): UniMatch's labeled stream learns both
    DIR/unlabeled.txt   every unlabeled image; the second field is its filtered mask, which UniMatch's
                        reader opens for its size only
    DIR/masks/<id>.png  the filtered masks (copies of <work>/masks)
    DIR/labels/<id>.png the ground truth as class ids + 255, for formats whose files are not (camvid, ade20k)

``list``: ``DIR/pseudo.txt``, one ``<absolute image> <absolute mask>`` line per unlabeled image, and
``DIR/masks/``: for any code that reads image/label pairs.

The folder is built beside DIR and renamed into place: an interrupted export leaves no half folder.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from pipeline.atomic import write_text_atomic
from pipeline.calibrate import MASKS
from pipeline.config import Config
from pipeline.datasets import Dataset, Sample
from pipeline.errors import UserError
from pipeline.masks import write_palette_png
from pipeline.maskset import cached_masks

TARGETS = ("unimatch", "list")
NATIVE_LABELS = ("voc", "folder")  # mask files that already hold class ids and 255


def export(config: Config, target: str, out: Path, force: bool = False, warn=print) -> dict:
    if target not in TARGETS:
        raise UserError(f"--to {target}: choose one of {', '.join(TARGETS)}")
    out = Path(out).absolute()
    if out.exists() and not force:
        raise UserError(f"{out} exists: pass --force to replace it, or choose another folder")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: is a file; give a folder to export into")
    dataset = Dataset(config)
    unlabeled, _, missing = cached_masks(config.work_dir, dataset.split("unlabeled"), True, "")
    if missing:
        warn(f"{missing} unlabeled images have no filtered mask (stage 0 could not read them): left out")
    labeled = dataset.split("labeled") if target == "unimatch" else []
    _no_spaces([str(p) for s in [*labeled, *unlabeled] for p in (s.image, s.mask) if p is not None] + [str(out)])

    staging = out.parent / f".{out.name}.export-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "masks").mkdir(parents=True)
    try:
        for sample in unlabeled:
            shutil.copyfile(config.work_dir / MASKS / f"{sample.id}.png", staging / "masks" / f"{sample.id}.png")
        mask_of = {s.id: out / "masks" / f"{s.id}.png" for s in unlabeled}
        if target == "list":
            lines = {"pseudo.txt": [f"{s.image.absolute()} {mask_of[s.id]}" for s in unlabeled]}
        else:
            root = Path(config.root).absolute()
            gt = [f"{_relative(s.image, root)} {_ground_truth(dataset, s, root, staging, out)}" for s in labeled]
            pseudo = [f"{_relative(s.image, root)} {mask_of[s.id]}" for s in unlabeled]
            lines = {"labeled.txt": gt + pseudo, "unlabeled.txt": pseudo}
        for name, content in lines.items():
            write_text_atomic(staging / name, "".join(line + "\n" for line in content))
        _install(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"out": out, "files": sorted(lines), "labeled": len(labeled), "unlabeled": len(unlabeled),
            "missing": missing}


def _ground_truth(dataset: Dataset, sample: Sample, root: Path, staging: Path, out: Path) -> str:
    """The labeled mask's path in the line: the user's own file when it already holds class ids and 255,
    else a converted copy under DIR/labels/."""
    if dataset.format in NATIVE_LABELS:
        return _relative(sample.mask, root)
    (staging / "labels").mkdir(exist_ok=True)
    write_palette_png(staging / "labels" / f"{sample.id}.png", dataset.read_mask(sample.mask))
    return str(out / "labels" / f"{sample.id}.png")


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
        raise UserError(f"{spaced}: a path with a space cannot be written in UniMatch's split format (its lines "
                        "are split on spaces); rename it or export to a folder without spaces")


def _install(staging: Path, out: Path) -> None:
    if out.exists():
        retired = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, retired)
        os.replace(staging, out)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, out)
