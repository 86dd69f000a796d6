"""Label masks, shared by every stage: the ignore value (255) and palette PNGs, where class ids are the pixel values
and any viewer shows colours."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.atomic import atomic_write

IGNORE = 255


def voc_palette() -> np.ndarray:
    """The PASCAL VOC colour map (256 x 3 uint8): the colours VOC masks are drawn with."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    for index in range(256):
        c, r, g, b = index, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette[index] = (r, g, b)
    return palette


PALETTE = voc_palette()
IGNORE_COLOUR = (255, 255, 255)  # ignore in pictures: white, which no palette entry 0..254 is (grey 128: VOC's car)


def colourise(mask: np.ndarray) -> np.ndarray:
    """uint8 (H, W) labels -> (H, W, 3) RGB in the palette's colours, ignore white."""
    rgb = PALETTE[mask]
    rgb[mask == IGNORE] = IGNORE_COLOUR
    return rgb


def write_palette_png(path: Path, mask: np.ndarray) -> None:
    """Write a uint8 (H, W) label mask atomically: readers never see a partial file."""
    path = Path(path)
    mask = np.ascontiguousarray(mask, dtype=np.uint8)
    img = Image.frombytes("P", (mask.shape[1], mask.shape[0]), mask.tobytes())
    img.putpalette(PALETTE.tobytes())
    with atomic_write(path) as tmp:
        img.save(tmp, format="PNG")
