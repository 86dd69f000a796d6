"""Augmentations without torchvision: PIL and numpy, every random choice from a given numpy Generator.

Geometry (scale, crop, flip) is applied to an image and any number of label masks together. Padding
added by the crop is reported in a separate ``valid`` mask, never written into the labels as a class
or confused with ignore (255): losses and statistics drop padded pixels by ``valid``.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter

from pipeline.labels import IGNORE

MEAN = np.array([0.485, 0.456, 0.406], np.float32)  # ImageNet statistics, as the backbones were trained
STD = np.array([0.229, 0.224, 0.225], np.float32)


def random_scale(image: np.ndarray, masks: list, rng: np.random.Generator, low: float, high: float):
    """Resize by a factor drawn from [low, high]: bilinear for the image, nearest for masks."""
    factor = rng.uniform(low, high)
    h, w = image.shape[:2]
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
    return image, [np.asarray(Image.fromarray(m).resize(size, Image.NEAREST)) for m in masks]


def random_crop(image: np.ndarray, masks: list, size: int, rng: np.random.Generator):
    """A size x size crop; images smaller than that are padded first. Returns (image, masks, valid)."""
    h, w = image.shape[:2]
    ph, pw = max(size - h, 0), max(size - w, 0)
    valid = np.ones((h, w), bool)
    if ph or pw:
        pad = ((0, ph), (0, pw))
        image = np.pad(image, (*pad, (0, 0)))
        masks = [np.pad(m, pad, constant_values=IGNORE) for m in masks]
        valid = np.pad(valid, pad, constant_values=False)
    h, w = image.shape[:2]
    top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    window = (slice(top, top + size), slice(left, left + size))
    return image[window], [m[window] for m in masks], valid[window]


def random_flip(image: np.ndarray, masks: list, valid: np.ndarray, rng: np.random.Generator):
    if rng.random() < 0.5:
        return image[:, ::-1], [m[:, ::-1] for m in masks], valid[:, ::-1]
    return image, masks, valid


def geometric(image: np.ndarray, masks: list, rng: np.random.Generator, crop: int, scale_range):
    """The weak view: random scale, crop (with padding reported in ``valid``), horizontal flip."""
    image, masks = random_scale(image, masks, rng, *scale_range)
    image, masks, valid = random_crop(image, masks, crop, rng)
    return random_flip(image, masks, valid, rng)


def photometric(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The strong view's colour changes (UniMatch's): jitter p=0.8, grayscale p=0.2, blur p=0.5."""
    img = Image.fromarray(np.ascontiguousarray(image))
    if rng.random() < 0.8:
        for op in rng.permutation(4):
            if op == 0:
                img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.5, 1.5))
            elif op == 1:
                img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.5, 1.5))
            elif op == 2:
                img = ImageEnhance.Color(img).enhance(rng.uniform(0.5, 1.5))
            else:
                hsv = np.asarray(img.convert("HSV")).copy()
                hsv[..., 0] = (hsv[..., 0].astype(np.int16) + int(rng.uniform(-0.25, 0.25) * 255)) % 256
                img = Image.fromarray(hsv, "HSV").convert("RGB")
    if rng.random() < 0.2:
        img = img.convert("L").convert("RGB")
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.1, 2.0)))
    return np.asarray(img)


def cutmix_box(size: int, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
    """bool (size, size): a random box (2-40% of the area, aspect 0.3-3.3) with probability p, else empty."""
    box = np.zeros((size, size), bool)
    if rng.random() >= p:
        return box
    area = rng.uniform(0.02, 0.4) * size * size
    ratio = rng.uniform(0.3, 1 / 0.3)
    h, w = min(size, int(np.sqrt(area * ratio))), min(size, int(np.sqrt(area / ratio)))
    top, left = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
    box[top:top + h, left:left + w] = True
    return box


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> normalised float (3, H, W)."""
    return torch.from_numpy(((image.astype(np.float32) / 255 - MEAN) / STD).transpose(2, 0, 1).copy())
