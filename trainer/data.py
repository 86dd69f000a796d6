"""Training and validation data over the dataset layer: labeled images with ground truth, unlabeled
images with their cached filtered masks (stage I) or weak + strong views (stage II), and val images.

Every random choice for sample i in epoch e comes from a generator seeded by (seed, e, role, i), so an
epoch is the same whatever the number of loader workers or processes, and a resumed run replays it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.data.datasets import Dataset, Sample, read_image
from pipeline.errors import UserError, describe
from pipeline.labels import IGNORE
from trainer.augment import cutmix_box, geometric, photometric, to_tensor
from trainer.recipes import Recipe

# each role's augmentation stream; a labeled-only run's unlabeled images are cropped as a masked run's are, so the
# two differ only in the masks' loss
ROLES = {"labeled": 0, "cached": 1, "images": 1, "unlabeled": 2}


class TrainImages(torch.utils.data.Dataset):
    """role: ``labeled`` (ground truth), ``cached`` (the filtered mask from stage 1), ``images`` (the weak
    view alone: a labeled-only stage I's unlabeled images), ``unlabeled`` (no label: the weak view and
    ``strong_views`` strong views with a CutMix box each, for stage II: ``strong`` / ``box``, then ``strong_2`` /
    ``box_2``)."""

    def __init__(self, dataset: Dataset, samples: list[Sample], role: str, recipe: Recipe,
                 masks_dir: Path | None = None, strong_views: int = 1):
        self.dataset, self.samples, self.role, self.recipe = dataset, samples, role, recipe
        self.masks_dir, self.strong_views = masks_dir, strong_views
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: int | tuple[int, int]) -> dict:
        """``item``: an index, or (index, draw) from `epoch_plan` (draw tells repeats of an image apart)."""
        index, draw = item if isinstance(item, tuple) else (item, 0)
        sample = self.samples[index]
        rng = np.random.default_rng([self.recipe.seed, self.epoch, ROLES[self.role], draw, index])
        image = read_image(sample.image)
        if self.role == "labeled":
            masks = [self.dataset.read_mask(sample.mask, image.shape[:2])]
        elif self.role == "cached":
            masks = [read_cached_mask(self.masks_dir / f"{sample.id}.png", image.shape[:2], self.dataset.num_classes)]
        else:
            masks = []
        image, masks, valid = geometric(image, masks, rng, self.recipe.crop, self.recipe.scale_range)
        out = {"image": to_tensor(image), "valid": torch.from_numpy(valid.copy())}
        if masks:
            out["mask"] = torch.from_numpy(masks[0].copy()).long()
        if self.role == "unlabeled":  # the second view draws after the first: the first stays as it was
            for view in range(1, self.strong_views + 1):
                suffix = "" if view == 1 else f"_{view}"
                out[f"strong{suffix}"] = to_tensor(photometric(image, rng))
                out[f"box{suffix}"] = torch.from_numpy(cutmix_box(self.recipe.crop, rng))
        return out


class ValImages(torch.utils.data.Dataset):
    """Whole validation images (normalised) and their masks, one at a time."""

    def __init__(self, dataset: Dataset, samples: list[Sample]):
        self.dataset, self.samples = dataset, samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.dataset.load(self.samples[index])
        return to_tensor(image), torch.from_numpy(mask).long()


def read_cached_mask(path: Path, size: tuple[int, int], num_classes: int) -> np.ndarray:
    fix = "rerun `conformalsam calibrate`: it rewrites missing and damaged masks"
    try:
        with Image.open(path) as img:
            mask = np.asarray(img)
    except FileNotFoundError:
        raise UserError(f"{path}: cached mask missing; {fix}") from None
    except Exception as exc:  # truncated or overwritten PNG
        raise UserError(f"{path}: cached mask is damaged ({describe(exc)}); {fix}") from None
    if mask.shape != tuple(size):
        raise UserError(f"{path}: cached mask is {mask.shape[1]}x{mask.shape[0]}, its image {size[1]}x{size[0]}; "
                        f"{fix}")
    if mask.max(initial=0) >= num_classes and not np.isin(mask[mask >= num_classes], [IGNORE]).all():
        raise UserError(f"{path}: cached mask has values outside 0..{num_classes - 1} and {IGNORE}")
    return mask


def label_counts(dataset: Dataset, samples: list[Sample]) -> np.ndarray:
    """(images, classes): each image's ground-truth pixels per class (ignore and void not counted)."""
    counts = np.zeros((len(samples), dataset.num_classes), np.int64)
    for row, sample in zip(counts, samples):
        mask = dataset.read_mask(sample.mask)
        row += np.bincount(mask[mask != IGNORE].ravel(), minlength=dataset.num_classes)[:dataset.num_classes]
    return counts


def epoch_plan(n_unlabeled: int, n_labeled: int, batch: int, seed: int, epoch: int) -> list[tuple[list, list]]:
    """The (labeled items, unlabeled items) of every step of an epoch, for all processes together; an item is
    (index, draw), draw = its position in the epoch, so the many repeats of a labeled image get their own
    augmentation.

    An epoch is one pass over the unlabeled set (full batches); the labeled set is cycled in fresh
    permutations to keep up, as UniMatch does.
    """
    if n_unlabeled == 0 or n_labeled == 0:
        raise UserError("training needs labeled and unlabeled images; a split list is empty")
    rng = np.random.default_rng([seed, epoch, 99])
    steps = max(1, n_unlabeled // batch)
    unlabeled = np.resize(rng.permutation(n_unlabeled), steps * batch)
    rounds = -(-steps * batch // n_labeled)
    labeled = np.concatenate([rng.permutation(n_labeled) for _ in range(rounds)])[: steps * batch]

    def items(indices, step):
        return [(int(i), step * batch + slot) for slot, i in enumerate(indices[step * batch:(step + 1) * batch])]

    return [(items(labeled, step), items(unlabeled, step)) for step in range(steps)]
