"""The toy world generator: deterministic, well-formed, splits in UniMatch format."""

from __future__ import annotations

import numpy as np
from PIL import Image

from pipeline.toy.world import CLASSES, LABELED_SIZES, SOURCE, TARGET, WorldSpec, generate, render, sample_rng


def _files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_generation_is_byte_identical_for_a_seed(tmp_path, toy_world):
    spec = WorldSpec(train=70, val=6, source_val=4, size=32)
    assert generate(tmp_path / "again", spec)
    assert _files(tmp_path / "again") == _files(toy_world)
    assert not generate(tmp_path / "again", spec)  # identical world present: nothing rebuilt


def test_another_seed_gives_another_world():
    a, _ = render(TARGET, sample_rng(0, "target", "train", 0), 32)
    b, _ = render(TARGET, sample_rng(1, "target", "train", 0), 32)
    assert not np.array_equal(a, b)


def test_layout_and_splits(toy_world):
    assert (toy_world / "target/classes.txt").read_text().split() == list(CLASSES)
    assert len(CLASSES) >= 8
    nested = []
    for n in LABELED_SIZES:
        labeled = (toy_world / f"splits/{n}/labeled.txt").read_text().splitlines()
        unlabeled = (toy_world / f"splits/{n}/unlabeled.txt").read_text().splitlines()
        assert len(labeled) == n and len(labeled) + len(unlabeled) == 70
        assert not set(labeled) & set(unlabeled)
        assert all(len(line.split()) == 2 for line in labeled + unlabeled)
        nested.append(set(labeled))
    assert nested[0] < nested[1] < nested[2]
    val = (toy_world / "splits/val.txt").read_text().splitlines()
    first = val[0].split()
    image = Image.open(toy_world / "target" / first[0])
    mask = Image.open(toy_world / "target" / first[1])
    assert image.size == mask.size == (32, 32) and mask.mode == "P"
    assert len(list((toy_world / "source/images").iterdir())) == 4


def test_images_hold_several_classes_with_occlusion():
    seen, multi = set(), 0
    for i in range(40):
        _, mask = render(TARGET, sample_rng(0, "target", "train", i), 128)
        present = set(np.unique(mask)) - {0}
        seen |= present
        multi += len(present) >= 2
    assert seen == set(range(1, len(CLASSES))) and multi >= 30


def test_domains_differ_in_appearance():
    def mean_color(domain):
        imgs = [render(domain, sample_rng(0, domain.name, "train", i), 64)[0] for i in range(20)]
        return np.stack(imgs).reshape(-1, 3).mean(0)

    assert SOURCE != TARGET
    assert np.abs(mean_color(SOURCE) - mean_color(TARGET)).max() > 5
