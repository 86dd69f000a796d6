"""`conformalsam data split` / `data list`: UniMatch-format split files for any data set.

The source is a folder of images (with ``--masks``, the folder of their masks, matched by file stem) or an
existing split list (its lines are kept as they are). The labeled images are a seeded random draw: the
same source, count and seed give the same files on any machine; labeled and unlabeled never overlap.
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import numpy as np

from pipeline.atomic import write_text_atomic
from pipeline.data.datasets import split_lines
from pipeline.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def labeled_count(text: str, total: int) -> int:
    """``--labeled``: a count (23), a fraction (0.0625) or a ratio (1/16) of ``total``, at least one."""
    try:
        value = Fraction(text)
    except (ValueError, ZeroDivisionError):
        raise UserError(f"--labeled {text}: give a count (23), a fraction (0.0625) or a ratio (1/16)") from None
    if value <= 0 or (value >= 1 and value.denominator != 1):
        raise UserError(f"--labeled {text}: give a whole count, or a fraction between 0 and 1")
    count = int(value) if value >= 1 else max(1, round(value * total))
    if count >= total:
        raise UserError(f"--labeled {text}: {count} of {total} images would leave none unlabeled")
    return count


def source_lines(source: Path, root: Path, masks: Path | None) -> list[str]:
    """The split lines ('image [mask]', relative to ``root``) of a folder of images or of a split list."""
    if source.is_file():
        if masks is not None:
            raise UserError(f"--masks: a split list ({source}) names its masks itself")
        try:
            lines = [" ".join(line.split()) for line in split_lines(source) if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"{source}: cannot read split list ({exc})") from None
        if not lines:
            raise UserError(f"{source}: split list has no lines")
        return _unique(lines, source)
    if not source.is_dir():
        raise UserError(f"{source}: no such folder or split list")
    images = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise UserError(f"{source}: no images in it ({', '.join(IMAGE_SUFFIXES)})")
    if masks is not None and not masks.is_dir():
        raise UserError(f"--masks {masks}: no such folder")
    lines = []
    for image in images:
        line = _relative(image, root)
        if masks is not None:
            mask = masks / f"{image.stem}.png"
            if not mask.is_file():
                missing = sum(not (masks / f"{i.stem}.png").is_file() for i in images)
                raise UserError(f"--masks {masks}: no {mask.name} for {image.name} ({missing} of {len(images)} "
                                "images have no <stem>.png mask there)")
            line += " " + _relative(mask, root)
        lines.append(line)
    return _unique(lines, source)


def _relative(path: Path, root: Path) -> str:
    """``path`` relative to ``root``, as written (a symlinked file or folder below the root stays as named);
    through symlinks only when the written path leads outside."""
    for a, b in ((path.absolute(), root.absolute()), (path.resolve(), root.resolve())):
        relative = Path(os.path.relpath(a, b))
        if relative.parts[:1] != ("..",):
            return relative.as_posix()
    raise UserError(f"{path}: not inside the data root {root} (split lines are relative to it; set "
                    "data.root / --root)")


def _unique(lines: list[str], source: Path) -> list[str]:
    """Refuse a source that names an image twice (by file stem, the image's id)."""
    seen: dict[str, str] = {}
    for line in lines:
        stem = Path(line.split()[0]).stem
        if stem in seen:
            raise UserError(f"{source}: image id '{stem}' twice ({seen[stem]} and {line.split()[0]}): ids are file "
                            "stems and must be unique")
        seen[stem] = line.split()[0]
    return lines


def _writable(path: Path, force: bool) -> None:
    if path.is_dir():
        raise UserError(f"--out {path}: is a folder; give the split file's path")
    if path.exists() and not force:
        raise UserError(f"{path} exists: pass --force to overwrite it, or choose another --out")
    if path.parent.exists() and not path.parent.is_dir():
        raise UserError(f"--out {path.parent}: is a file, not a folder")


def write_list(lines: list[str], out: Path, force: bool = False) -> Path:
    """Every line in one split list (a val.txt)."""
    _writable(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, "".join(f"{line}\n" for line in lines))
    return out


def write_split(lines: list[str], count: int, seed: int, out: Path, force: bool = False) -> tuple[Path, Path]:
    """``count`` lines drawn with ``seed`` -> out/labeled.txt, the rest -> out/unlabeled.txt (source order)."""
    if any(len(line.split()) < 2 for line in lines):
        raise UserError("labeled images need masks: give --masks with a folder of images, or a split list "
                        "whose lines name 'image mask'")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file; give the folder for labeled.txt and unlabeled.txt")
    labeled, unlabeled = out / "labeled.txt", out / "unlabeled.txt"
    for path in (labeled, unlabeled):
        _writable(path, force)
    chosen = set(np.random.default_rng(seed).permutation(len(lines))[:count].tolist())
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(labeled, "".join(f"{line}\n" for i, line in enumerate(lines) if i in chosen))
    write_text_atomic(unlabeled, "".join(f"{line}\n" for i, line in enumerate(lines) if i not in chosen))
    return labeled, unlabeled
