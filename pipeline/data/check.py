"""`conformalsam data check`: every problem of a data set, counted by kind, without stopping at the first."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from pipeline.data.datasets import SPLITS, Dataset, Sample, exif_orientation, parse_split, read_image
from pipeline.errors import DataProblem, UserError
from pipeline.parallel import thread_map


class Warned(DataProblem):
    """Worth a look but not an error: `data check` lists it and still exits 0."""


@dataclass
class Report:
    images: dict[str, int] = field(default_factory=dict)  # split -> samples listed
    problems: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))  # kind -> messages
    warnings: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))  # kind -> messages

    def add(self, problem: DataProblem) -> None:
        (self.warnings if isinstance(problem, Warned) else self.problems)[problem.kind].append(str(problem))

    @property
    def ok(self) -> bool:
        return not self.problems


def check_sample(dataset: Dataset, sample: Sample) -> list[DataProblem]:
    """The problems of one image and its mask: both fully decoded, the mask checked against the image."""
    found, size = [], None
    try:
        size = read_image(sample.image).shape[:2]
        orientation = exif_orientation(sample.image)
        if orientation != 1:
            found.append(Warned("EXIF orientation", f"{sample.image}: EXIF orientation {orientation}; images are "
                                "read as stored, not rotated (as UniMatch does): its mask must match the stored "
                                "pixels"))
    except DataProblem as problem:
        found.append(problem)
    if sample.mask is not None:
        try:
            dataset.read_mask(sample.mask, size)
        except DataProblem as problem:
            found.append(problem)
    return found


def check_dataset(dataset: Dataset, progress=None, n_jobs: int = 4) -> Report:
    """Check split lists, cross-split overlaps, then every listed image and mask (threads: I/O bound)."""
    report = Report()
    try:
        dataset.classes
    except UserError as exc:
        report.add(DataProblem("class list", str(exc)))
        return report
    per_split: dict[str, list[Sample]] = {}
    for split in SPLITS:
        if split == "val" and dataset.config.val is None:
            continue
        samples, problems = parse_split(dataset.split_path(split), dataset.root, need_masks=split != "unlabeled")
        per_split[split] = samples
        report.images[split] = len(samples)
        for problem in problems:
            report.add(problem)
    ids = {split: {s.id for s in samples} for split, samples in per_split.items()}
    for a, b in (("labeled", "unlabeled"), ("labeled", "val"), ("unlabeled", "val")):
        for shared in sorted(ids.get(a, set()) & ids.get(b, set())):
            report.add(DataProblem("split overlap", f"id '{shared}' is in both the {a} and the {b} split"))
    # an image listed in several splits is checked once
    unique = list({(s.image, s.mask): s for samples in per_split.values() for s in samples}.values())

    def checked(sample: Sample) -> list[DataProblem]:
        found = check_sample(dataset, sample)
        if progress is not None:
            progress(1, len(unique))
        return found

    for found in thread_map(checked, unique, n_jobs):
        for problem in found:
            report.add(problem)
    return report
