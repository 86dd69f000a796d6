"""`conformalsam inspect`: pictures of what calibration did, written to ``<work>/inspect/``.

- ``sheets/<id>.png``, one contact sheet per chosen image (those of earlier calls go): image | raw foundation argmax | filtered mask | ground truth (when
  the split has it) | a trained checkpoint's prediction (when given), and a legend of the classes shown;
  ignore (255) is white, a colour no class of the palette has;
- ``alpha-sweep.png`` (and its figures in ``alpha-sweep.json``): what the calibrated mode and rule do at each
  alpha, from the labeled set (cross-calibrated coverage, held-out kept share and accuracy of the kept labels)
  and the saved histograms, with the calibrated alpha marked; no retraining;
- ``training-curves.png``: val mIoU and loss of the work folder's runs;
- ``index.html``: the page of the masks (`pipeline.outputs.page`).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from pipeline.atomic import write_text_atomic
from pipeline.outputs.page import save_picture, write_page
from pipeline.outputs.plots import plot_sweep, plot_training
from pipeline.stage1.calibrate import Settings, assign_folds, cross_calibrate, filtered_mask, thresholds_of
from pipeline.stage1.conformal import SECOND_FLOOR, ScoreHistogram, background_index, check_alpha, fit, to_bins
from pipeline.stage1.held_out import held_out
from pipeline.data.datasets import Dataset, read_image
from pipeline.errors import UserError
from pipeline.labels import IGNORE, IGNORE_COLOUR, PALETTE, colourise
from pipeline.stage1.record import HISTOGRAMS, read_calibration
from pipeline.stage0.store import LogitsStore
from trainer.augment import to_tensor
from trainer.checkpoint import load_trained

BACKGROUND = (40, 40, 40)  # the sheet's own background, so that white ignore regions read as regions
TILE = 256  # tiles are scaled (nearest for labels) so that small images stay legible
SWEEP_PNG, CURVES_PNG, SHEETS = "alpha-sweep.png", "training-curves.png", "sheets"


def contact_sheet(tiles: list[tuple[str, np.ndarray]], legend: list[tuple[str, tuple]] = ()) -> Image.Image:
    """Tiles (caption, RGB array) side by side, scaled to a common height, captions above, and a legend
    (name, colour) below."""
    font = ImageFont.load_default()
    height = max(TILE, max(t.shape[0] for _, t in tiles))
    pictures = []
    for _, tile in tiles:
        scale = height / tile.shape[0]
        size = (max(1, round(tile.shape[1] * scale)), height)
        pictures.append(Image.fromarray(np.ascontiguousarray(tile)).resize(size, Image.NEAREST))
    gap, top, row = 6, 18, 16
    width = sum(p.width for p in pictures) + gap * (len(pictures) + 1)
    per_row = max(1, width // 150)
    rows = -(-len(legend) // per_row)
    sheet = Image.new("RGB", (width, height + top + gap + rows * row + (gap if rows else 0)), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    x = gap
    for (caption, _), picture in zip(tiles, pictures):
        draw.text((x, 3), caption, fill=(255, 255, 255), font=font)
        sheet.paste(picture, (x, top))
        x += picture.width + gap
    for i, (name, colour) in enumerate(legend):
        x, y = gap + (i % per_row) * 150, top + height + gap + (i // per_row) * row
        draw.rectangle([x, y + 2, x + 12, y + 12], fill=tuple(int(c) for c in colour), outline=(255, 255, 255))
        draw.text((x + 18, y + 1), name, fill=(255, 255, 255), font=font)
    return sheet


def legend_of(classes, masks: list[np.ndarray]) -> list[tuple[str, tuple]]:
    """(name, colour) of every class that appears in the masks, then ignore when it does."""
    present = np.unique(np.concatenate([m.ravel() for m in masks]))
    entries = [(classes[c], tuple(PALETTE[c])) for c in present if c < len(classes)]
    return entries + ([("ignore (255)", IGNORE_COLOUR)] if IGNORE in present else [])


SWEEP_ALPHAS = tuple(round(0.02 * i, 2) for i in range(1, 21))  # 0.02 .. 0.40, and the calibrated alpha


def sweep(record: dict, store: LogitsStore, dataset: Dataset, histograms: dict, alphas=SWEEP_ALPHAS, jobs: int = 1,
          progress=None) -> dict:
    """What the calibrated mode and rule would do at each alpha, from the labeled set and the saved histograms
    (no retraining): cross-calibrated coverage (per image for crc, whose guarantee that is; per pixel otherwise),
    the held-out share of labeled pixels kept and the accuracy of their labels (`held_out`), and, where one
    threshold serves every class (paper and crc modes), the share of unlabeled pixels the masks would keep."""
    mode, rule = record["mode"], record["rule"]
    settings = Settings(alpha=record["alpha"], mode=mode, rule=rule, **record["settings"])
    hist = ScoreHistogram.from_arrays(histograms["counts"], histograms["mass"], histograms["images"])
    labeled = [s for s in dataset.split("labeled") if s.id in store]
    alphas = sorted({*alphas, record["alpha"]})
    for alpha in alphas:
        check_alpha(alpha)
    held = held_out(store, dataset, labeled, assign_folds(labeled, settings), hist, mode, rule, alphas, jobs,
                    progress)
    coverage = "image_coverage" if mode == "crc" else "pixel_coverage"
    rows = []
    for i, alpha in enumerate(held.alphas):
        cross = cross_calibrate(hist, replace(settings, alpha=alpha), range(hist.num_classes))
        rows.append({"alpha": alpha, "coverage": cross[coverage], "kept": float(held.kept[i]),
                     "accuracy": None if np.isnan(held.accuracy[i]) else float(held.accuracy[i]),
                     "kept_unlabeled": unlabeled_kept(histograms, hist, alpha, mode, rule)})
    return {"mode": mode, "rule": rule, "alpha": record["alpha"], "coverage": coverage, "top1": held.top1_accuracy,
            "rows": rows}


def unlabeled_kept(histograms: dict, hist: ScoreHistogram, alpha: float, mode: str, rule: str) -> float | None:
    """The share of unlabeled pixels the masks keep at ``alpha``, from the histograms of each pixel's best and
    second score (with one threshold q a set is non-empty iff best <= q, a singleton iff also second > q); None
    for mondrian (a threshold per class) and where the histograms cannot tell."""
    best, second = histograms.get("unlabeled_best"), histograms.get("unlabeled_second")
    if mode == "mondrian" or best is None or not best.sum():
        return None
    if rule == "argmax":
        return 1.0
    q = float(fit(hist.total(), alpha, mode).q[0])
    b = int(to_bins(torch.tensor([q]))[0])
    if rule == "paper":
        return float(best[: b + 1].sum() / best.sum())
    if second is None or q >= 1 - SECOND_FLOOR:  # below SECOND_FLOOR the second is recorded as 0
        return None
    return float((best[: b + 1].sum() - second[: b + 1].sum()) / best.sum())


def load_histograms(path: Path) -> dict:
    try:
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise UserError(f"{path}: no saved histograms; run `conformalsam calibrate` first") from None


def run_inspect(config, ids: list[str] | None = None, count: int = 6, seed: int = 0, split: str = "unlabeled",
                checkpoint: Path | None = None, alphas=SWEEP_ALPHAS, jobs: int = 1, progress=None) -> dict:
    """Contact sheets for chosen (or ``count`` random) images of a split, the alpha sweep (PNG and JSON), the
    training curves of the work folder's runs, and the page of the masks (`pipeline.outputs.page`)."""
    work = config.work_dir
    record = read_calibration(work, required=True)
    dataset, store = Dataset(config), LogitsStore(work / "logits.zarr")
    samples = {s.id: s for s in dataset.split(split) if s.id in store}
    if not samples:
        raise UserError(f"--split {split}: none of its images is scored; run `conformalsam logits --split {split}` "
                        "first, or choose another --split")
    if ids:
        unknown = [i for i in ids if i not in samples]
        if unknown:
            raise UserError(f"--ids: {unknown[0]} is not a scored image of the {split} split (another split: --split)")
        chosen = [samples[i] for i in ids]
    else:
        order = np.random.default_rng(seed).permutation(len(samples))[:count]
        chosen = [list(samples.values())[i] for i in sorted(order)]
    q = thresholds_of(record)
    model, state = load_trained(checkpoint, dataset.classes) if checkpoint else (None, None)
    if checkpoint:  # which run, stage and epoch the prediction panel shows
        path = Path(checkpoint)
        predicted = f"{path.parent.parent.name}/{path.parent.name}/{path.name}, epoch {state['epoch']}"
    out = work / "inspect"
    sheets = out / SHEETS
    written = []
    predictor = (lambda image: _predict(model, image)) if model is not None else None
    for sample in chosen:
        label, raw, _, _ = filtered_mask(store, sample.id, q, record["rule"], background_index(dataset.classes))
        image = read_image(sample.image)
        masks = [("raw argmax", raw.numpy().astype(np.uint8)), (f"filtered (alpha {record['alpha']})",
                                                                label.numpy().astype(np.uint8))]
        if sample.mask is not None and sample.mask.is_file():
            masks.append(("ground truth", dataset.read_mask(sample.mask, image.shape[:2])))
        if model is not None:
            masks.append((predicted, predictor(image)))
        tiles = [("image", image)] + [(caption, colourise(m)) for caption, m in masks]
        legend = legend_of(dataset.classes, [m for _, m in masks])
        save_picture(contact_sheet(tiles, legend), sheets / f"{sample.id}.png")
        written.append(sheets / f"{sample.id}.png")
    for stale in sheets.glob("*.png"):  # sheets of earlier calls (other images, splits or checkpoints)
        if stale not in written:
            stale.unlink()
    swept = sweep(record, store, dataset, load_histograms(work / HISTOGRAMS), alphas, jobs, progress)
    figures = {}
    if swept["rows"]:
        plot_sweep(swept, out / SWEEP_PNG)
        write_text_atomic(out / "alpha-sweep.json", json.dumps(swept, indent=1) + "\n")
        figures["Alpha sweep"] = out / SWEEP_PNG
    if training_curves(work):
        figures["Training curves"] = out / CURVES_PNG
    page = write_page(out, record, store, dataset, count, seed, figures, work, progress,
                      (predicted, predictor) if model is not None else None, written)
    return {"sheets": written, "sweep": swept, "record": record, "figures": list(figures.values()), "page": page}


def training_curves(work: Path) -> Path | None:
    """``<work>/inspect/training-curves.png`` from every run's metrics.jsonl, or None when no run has one."""
    runs = {}
    for metrics in sorted((work / "runs").glob("*/stage*/metrics.jsonl")):
        lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        runs.setdefault(metrics.parent.parent.name, {})[metrics.parent.name] = lines
    path = work / "inspect" / CURVES_PNG
    return path if plot_training(runs, path) else None


@torch.no_grad()
def _predict(model, image: np.ndarray) -> np.ndarray:
    return model(to_tensor(image)[None]).argmax(1)[0].numpy().astype(np.uint8)
