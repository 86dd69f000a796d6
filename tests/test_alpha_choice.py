"""Choosing alpha from the labeled set: held-out pseudo-labels against brute force, the rules on trade-offs known
by construction, determinism, and the warning when the filter removes almost nothing."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from conftest import ANNOTATOR, toy_config, work_copy
from pipeline.stage1.alpha_rules import RULES, choose, class_iou, scores
from pipeline.stage1.calibrate import Settings, accumulate, assign_folds, filtered_mask, run_calibrate
from pipeline.stage1.conformal import background_index, fit
from pipeline.data.datasets import Dataset
from pipeline.stage1.held_out import HeldOut, held_out
from pipeline.labels import IGNORE
from pipeline.metrics import confusion
from pipeline.stage1.rawscore import raw_argmax
from pipeline.stage0.store import LogitsStore


def labeled_set(toy_world, scored, tmp_path, settings):
    config = work_copy(toy_world, scored, tmp_path)
    dataset, store = Dataset(config), LogitsStore(config.work_dir / "logits.zarr")
    labeled = dataset.split("labeled")
    return dataset, store, labeled, accumulate(store, dataset, labeled, settings, jobs=1)


@pytest.mark.parametrize("mode,rule", [("paper", "paper"), ("crc", "singleton"), ("mondrian", "paper")])
def test_held_out_equals_masks_made_with_the_other_folds_thresholds(toy_world, scored, tmp_path, mode, rule):
    settings = Settings(alpha=0.1, mode=mode, rule=rule)
    dataset, store, labeled, hist = labeled_set(toy_world, scored, tmp_path, settings)
    fold_of = assign_folds(labeled, settings)
    alphas = [0.08, 0.2, 0.4]
    held = held_out(store, dataset, labeled, fold_of, hist, mode, rule, alphas, jobs=1)
    assert held.alphas == tuple(alphas)
    k, background = dataset.num_classes, background_index(dataset.classes)
    expected, top1 = np.zeros((len(alphas), k, k + 1), np.int64), np.zeros((k, k), np.int64)
    for sample in labeled:
        truth = dataset.read_mask(sample.mask, store.image_size(sample.id))
        top1 += confusion(raw_argmax(store, sample.id), truth, k)
        others = [f for f in range(hist.folds) if f != fold_of[sample.id]]
        for a, alpha in enumerate(alphas):
            label = filtered_mask(store, sample.id, fit(hist.select(others), alpha, mode).q, rule, background)[0]
            label = np.where(label.numpy() == IGNORE, k, label.numpy())
            expected[a] += confusion(label, truth, k, k + 1)
    np.testing.assert_array_equal(held.confusion, expected)
    np.testing.assert_array_equal(held.top1, top1)
    assert held.top1_accuracy == pytest.approx(np.trace(top1) / top1.sum())
    if rule == "paper":  # the paper rule keeps a pixel iff its set is non-empty: fewer as alpha grows
        assert np.all(np.diff(held.kept) <= 0)
    again = held_out(store, dataset, labeled, fold_of, hist, mode, rule, alphas, jobs=2)
    np.testing.assert_array_equal(again.confusion, held.confusion)  # threads change nothing


def test_an_alpha_without_a_finite_threshold_in_some_fold_is_left_out(toy_world, scored, tmp_path):
    settings = Settings(alpha=0.1, mode="crc", rule="singleton")
    dataset, store, labeled, hist = labeled_set(toy_world, scored, tmp_path, settings)
    # crc needs n >= 1/alpha - 1 images: 4 of 5 folds of 16 images hold 12 or 13
    held = held_out(store, dataset, labeled, assign_folds(labeled, settings), hist, "crc", "singleton",
                    [0.05, 0.1], jobs=1)
    assert held.alphas == (0.1,)


def held(*confusions) -> HeldOut:
    """Held-out results at alphas 0.1, 0.2, ... from (K, K + 1) confusions; top-1 from the first (no filter)."""
    conf = np.array(confusions, np.int64)
    first = conf[0]
    return HeldOut(tuple(round(0.1 * (i + 1), 1) for i in range(len(conf))), conf, first[:, :-1])


# Three classes, 100 pixels each. The unfiltered masks: 80 right, 20 wrong per class (sent to the next class).
UNFILTERED = np.array([[80, 20, 0, 0], [0, 80, 20, 0], [20, 0, 80, 0]])


def test_when_the_filter_removes_only_errors_every_rule_but_the_baseline_takes_it():
    errors_removed = np.array([[80, 0, 0, 20], [0, 80, 0, 20], [0, 0, 80, 20]])
    h = held(UNFILTERED, errors_removed)
    assert h.kept.tolist() == [1.0, 0.8] and h.accuracy.tolist() == [0.8, 1.0]
    for rule in RULES:
        assert choose(h, rule) == (0 if rule == "kept-correct" else 1), rule  # kept-correct: a tie, the first


def test_when_the_filter_removes_only_right_pixels_every_rule_keeps_them():
    right_removed = np.array([[40, 20, 0, 40], [0, 40, 20, 40], [20, 0, 40, 40]])
    h = held(UNFILTERED, right_removed)
    for rule in RULES:
        assert choose(h, rule) == 0, rule


def test_a_trade_off_each_rule_resolves_as_documented():
    # alpha 0.2 removes 15 wrong and 15 right pixels per class; alpha 0.3 all 20 wrong and 50 right ones
    some = np.array([[65, 5, 0, 30], [0, 65, 5, 30], [5, 0, 65, 30]])
    most = np.array([[30, 0, 0, 70], [0, 30, 0, 70], [0, 0, 30, 70]])
    h = held(UNFILTERED, some, most)
    # TP / (TP + FP + wrong FN + w ignored), the same for every class here
    np.testing.assert_allclose(class_iou(h.confusion, 1.0)[:, 0], [80 / 120, 65 / 105, 30 / 100])
    np.testing.assert_allclose(class_iou(h.confusion, 0.5)[:, 0], [80 / 120, 65 / 90, 30 / 65])
    assert choose(h, "miou-ignore-miss") == 0
    assert choose(h, "miou-ignore-half") == 1
    assert choose(h, "miou-kept") == 2  # on kept pixels alone the hardest filter is perfect
    assert choose(h, "noise-5%") == 2 and choose(h, "noise-2%") == 2  # 7.1% wrong at 0.2, none at 0.3
    assert scores(h, "kept-correct").tolist() == pytest.approx([0.8, 0.65, 0.3])


def test_noise_rule_takes_the_most_kept_under_its_bound_or_else_the_least_wrong():
    slightly = np.array([[78, 2, 0, 20], [0, 78, 2, 20], [2, 0, 78, 20]])  # 2.5% wrong, 80% kept
    clean = np.array([[50, 0, 0, 50], [0, 50, 0, 50], [0, 0, 50, 50]])  # 0% wrong, 50% kept
    h = held(UNFILTERED, slightly, clean)
    assert choose(h, "noise-5%") == 1 and choose(h, "noise-2%") == 2
    assert choose(held(UNFILTERED, slightly), "noise-2%") == 1  # none under 2%: the least wrong


def warnings_of(config, alpha, **kw):
    said = []
    record = run_calibrate(config, Settings(alpha=alpha, **kw), jobs=1, warn=said.append)
    return record, [w for w in said if "removes almost nothing" in w]


def test_the_no_op_case_is_warned_with_the_annotators_accuracy(toy_world, scored, tmp_path):
    # an annotator 80% right, unsure where right and sure where wrong: at alpha 0.25 every set is its argmax alone
    config = synthetic_world(tmp_path / "confident", errors_confident=True)
    record, said = warnings_of(config, 0.25)
    kept = record["diagnostics"]["unlabeled"]["kept_fraction"]
    held_out_figures = record["diagnostics"]["held_out"]
    assert kept > 0.99 and len(said) == 1
    top1 = held_out_figures["top1_accuracy"]
    assert top1 == pytest.approx(0.8) and held_out_figures["kept_accuracy"] == pytest.approx(top1)
    assert f"top-1 accuracy on the labeled pixels is {top1:.1%}" in said[0] and "1 - alpha = 75%" in said[0]
    assert "at or above 1 - alpha" in said[0] and f"keeps {kept:.1%} of the unlabeled pixels" in said[0]
    assert warnings_of(config, 0.25)[1] == said  # a rerun that changes nothing says it again
    assert warnings_of(config, 0.25, rule="argmax")[1] == []  # unfiltered masks on purpose: nothing to say
    toy = work_copy(toy_world, scored, tmp_path)
    record, said = warnings_of(toy, 0.4)
    assert record["diagnostics"]["unlabeled"]["kept_fraction"] < 0.99 and said == []
    assert record["diagnostics"]["held_out"]["kept_fraction"] < 0.99


def test_sets_so_wide_that_the_paper_rule_relabels_are_not_called_a_no_op(toy_world, scored, tmp_path):
    config = work_copy(toy_world, scored, tmp_path)
    for mode, fix in (("paper", "Use a larger alpha, or --rule singleton"), ("mondrian", "Use --rule singleton (")):
        said = []
        record = run_calibrate(config, Settings(alpha=0.001, mode=mode), jobs=1, warn=said.append)
        held = record["diagnostics"]["held_out"]
        quality = record["diagnostics"]["unlabeled"]["quality"]
        assert record["diagnostics"]["unlabeled"]["kept_fraction"] > 0.99
        assert held["kept_accuracy"] < held["top1_accuracy"] - 0.01  # worse than raw, held out ...
        assert quality["filtered_kept"]["pixel_accuracy"] < quality["raw"]["pixel_accuracy"] - 0.01  # ... and here
        (warning,) = [w for w in said if "relabels them for the worse" in w]
        assert f"{held['kept_accuracy']:.1%} of the kept labeled pixels are right" in warning and fix in warning
        assert not any("removes almost nothing" in w for w in said)


def test_without_masks_the_warning_uses_the_held_out_kept_fraction(toy_world, scored, tmp_path):
    config = replace(toy_config(toy_world), weights=ANNOTATOR, work_dir=work_copy(toy_world, scored, tmp_path).work_dir)
    said = []
    record = run_calibrate(config, Settings(alpha=0.01), write_masks=False, jobs=1, warn=said.append)
    kept = record["diagnostics"]["held_out"]["kept_fraction"]
    assert kept > 0.99 and any(f"keeps {kept:.1%} of the labeled pixels, held out by fold" in w for w in said)


def synthetic_world(root, errors_confident: bool, images: int = 24, side: int = 10):
    """Three classes; per image, 80% of pixels one kind and 20% the other: with ``errors_confident`` False the
    annotator is sure and right on the 80% (p 0.9) and unsure and wrong on the 20% (p 0.6 on a wrong class,
    0.3 on the true one), so the best masks drop exactly the 20%; with True it is unsure and right on the 80%
    (p 0.6) and sure and wrong on the 20% (p 0.9), so filtering can only remove right pixels."""
    from conftest import make_config, write_gray_png, write_image
    from pipeline.stage0.store import open_for_writing, write_scores

    rng = np.random.default_rng(0)
    (root / "classes.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("a\nb\nc\n")
    store = root / "work" / "logits.zarr"
    open_for_writing(store, {"classes": ["a", "b", "c"], "backend": "test", "model_id": "synthetic",
                             "weights_sha256": "", "score_kind": "probabilities", "scale": "native"}, force=False)
    lines = []
    for i in range(images):
        truth = rng.integers(0, 3, (side, side))
        wrong = np.zeros((side, side), bool)
        wrong.flat[rng.permutation(side * side)[: side * side // 5]] = True
        other = (truth + rng.integers(1, 3, truth.shape)) % 3
        top, p_top = np.where(wrong, other, truth), np.where(wrong == errors_confident, 0.9, 0.6)
        probs = np.zeros((3, side, side))
        p_true = np.where(wrong, 0.3 if not errors_confident else 0.05, p_top)
        for c in range(3):
            probs[c] = np.where(top == c, p_top, np.where(truth == c, p_true, 0.0))
        probs += (1 - probs.sum(0, keepdims=True)) * (probs == 0) / np.maximum((probs == 0).sum(0, keepdims=True), 1)
        write_image(root / "images" / f"im{i}.png", rng, (side, side))
        write_gray_png(root / "masks" / f"im{i}.png", truth)
        write_scores(store, f"im{i}", probs.astype(np.float16), (side, side))
        lines.append(f"images/im{i}.png masks/im{i}.png")
    (root / "labeled.txt").write_text("\n".join(lines[:16]) + "\n")
    (root / "unlabeled.txt").write_text("\n".join(lines[16:]) + "\n")
    return replace(make_config(root, "folder", root / "labeled.txt", root / "unlabeled.txt"), backend="test")


def held_out_of(config, alphas):
    settings = Settings(alpha=alphas[0])
    dataset, store = Dataset(config), LogitsStore(config.work_dir / "logits.zarr")
    labeled = dataset.split("labeled")
    hist = accumulate(store, dataset, labeled, settings, jobs=1)
    return held_out(store, dataset, labeled, assign_folds(labeled, settings), hist, "paper", "paper", alphas)


ALPHAS = [0.02 * i for i in range(1, 26)]


def test_on_a_store_whose_errors_are_the_unsure_pixels_the_rules_drop_exactly_them(tmp_path):
    held = held_out_of(synthetic_world(tmp_path, errors_confident=False), ALPHAS)
    for rule in ("noise-5%", "noise-2%", "miou-ignore-miss", "miou-ignore-half", "worst-class"):
        pick = choose(held, rule)
        assert held.kept[pick] == pytest.approx(0.8) and held.accuracy[pick] == 1.0, rule
    assert held.kept[0] == 1.0 and held.accuracy[0] == pytest.approx(0.8)  # the smallest alpha keeps them


def test_on_a_store_whose_errors_are_confident_the_rules_keep_every_pixel(tmp_path):
    held = held_out_of(synthetic_world(tmp_path, errors_confident=True), ALPHAS)
    for rule in ("noise-5%", "miou-ignore-miss", "miou-ignore-half", "kept-correct", "worst-class"):
        assert held.kept[choose(held, rule)] == 1.0, rule
