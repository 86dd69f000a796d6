"""`conformalsam data convert`: Cityscapes' official gtFine `*_labelIds.png` -> `*_labelTrainIds.png`
beside them (the 19 evaluation classes 0..18, everything else 255), what UniMatch's split lines name.

Only missing trainIds files are written (`--force`: all); each one atomically, so an interrupted run
leaves no half file and a rerun continues. The mapping is Cityscapes' label table
(`pipeline.data.datasets.CITYSCAPES_TRAIN_IDS`).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from pipeline.data.datasets import CITYSCAPES_TRAIN_IDS, LABEL_IDS, SPLITS, TRAIN_IDS, Dataset, parse_split
from pipeline.errors import UserError
from pipeline.labels import write_palette_png

LOOKUP = np.full(256, 255, np.uint8)
for label_id, train_id in CITYSCAPES_TRAIN_IDS.items():
    LOOKUP[label_id] = train_id


def to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    return LOOKUP[label_ids.astype(np.uint8)]


def convert_cityscapes(dataset: Dataset, force: bool = False, progress=None) -> dict:
    if dataset.format != "cityscapes":
        raise UserError(f"data convert: the {dataset.format} format needs no conversion (only cityscapes: "
                        "labelIds -> trainIds)")
    targets = {}
    for split in SPLITS:
        if split == "val" and dataset.config.val is None:
            continue
        samples, _ = parse_split(dataset.split_path(split), dataset.root, need_masks=False)
        targets.update({s.mask: s for s in samples if s.mask is not None and s.mask.name.endswith(TRAIN_IDS)})
    todo = [t for t in sorted(targets) if force or not t.exists()]
    missing = [t for t in todo if not t.with_name(t.name[: -len(TRAIN_IDS)] + LABEL_IDS).exists()]
    if missing:
        raise UserError(f"{missing[0].with_name(missing[0].name[: -len(TRAIN_IDS)] + LABEL_IDS)}: not found "
                        f"({len(missing)} masks have neither file); unpack gtFine_trainvaltest.zip under data.root")
    if progress is not None:
        progress(0, len(todo))
    for target in todo:
        source = target.with_name(target.name[: -len(TRAIN_IDS)] + LABEL_IDS)
        try:
            with Image.open(source) as img:
                ids = np.asarray(img)
        except Exception as exc:
            raise UserError(f"{source}: cannot decode ({type(exc).__name__}); re-extract it from gtFine") from None
        write_palette_png(target, to_train_ids(ids))
        if progress is not None:
            progress(1)
    return {"written": len(todo), "present": len(targets) - len(todo)}
