"""`conformalsam inspect`: pictures of what calibration did, written to ``<work>/inspect/``.

- one contact sheet per chosen image: image | raw foundation argmax | filtered mask | ground truth (when
  the split has it) | a trained checkpoint's prediction (when given), and a legend of the classes shown;
  ignore (255) is white, a colour no class of the palette has;
- ``alpha-sweep.png``: cross-calibrated coverage and the kept fraction of unlabeled pixels against alpha,
  computed from the histograms calibrate saved (no new pass over the data, no retraining), with the
  calibrated alpha marked.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from pipeline.atomic import atomic_write
from pipeline.stage1.calibrate import Settings, cross_calibrate, filtered_mask, thresholds_of
from pipeline.stage1.conformal import SECOND_FLOOR, ScoreHistogram, background_index, check_alpha, fit, to_bins
from pipeline.data.datasets import Dataset, read_image
from pipeline.errors import UserError
from pipeline.labels import IGNORE, IGNORE_COLOUR, PALETTE, colourise
from pipeline.stage1.record import HISTOGRAMS, read_calibration
from pipeline.stage0.store import LogitsStore
from trainer.augment import to_tensor
from trainer.checkpoint import load_trained

BACKGROUND = (40, 40, 40)  # the sheet's own background, so that white ignore regions read as regions
TILE = 256  # tiles are scaled (nearest for labels) so that small images stay legible


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


def save_png(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        image.save(tmp, format="PNG")


def alpha_sweep(histograms: dict, alphas) -> list[dict]:
    """Per alpha, in the pooled (paper) mode: qhat on all labeled pixels, its coverage by cross-calibration
    over the saved folds (calibrate's own `fit` and `cross_calibrate`), and the fraction of unlabeled
    pixels kept by the paper and singleton rules."""
    hist = ScoreHistogram.from_arrays(histograms["counts"], histograms["mass"], histograms["images"])
    best, second = histograms.get("unlabeled_best"), histograms.get("unlabeled_second")
    pixels = None if best is None else best.sum()
    rows = []
    for alpha in alphas:
        check_alpha(alpha)
        try:
            q = float(fit(hist.total(), alpha, "paper").q[0])
        except UserError:
            continue  # infinite threshold: nothing to draw
        b = int(to_bins(torch.tensor([q]))[0])
        coverage = cross_calibrate(hist, Settings(alpha=alpha), range(hist.num_classes))["pixel_coverage"]
        row = {"alpha": alpha, "qhat": q, "coverage": coverage}
        if pixels:
            row["kept_paper"] = float(best[: b + 1].sum() / pixels)
            if q < 1 - SECOND_FLOOR:  # beyond, second probabilities below SECOND_FLOOR (recorded as 0) would count
                row["kept_singleton"] = float((best[: b + 1].sum() - second[: b + 1].sum()) / pixels)
        rows.append(row)
    return rows


# label, colour, dash (on, off pixels; None: solid), marker, value of a sweep row
SERIES = [("1 - alpha (target)", (120, 120, 120), (6, 4), "ring", lambda r: 1 - r["alpha"]),
          ("coverage (cross-cal.)", (31, 119, 180), None, "square", lambda r: r["coverage"]),
          ("kept, paper rule", (214, 39, 40), (2, 3), "diamond", lambda r: r.get("kept_paper")),
          ("kept, singleton rule", (44, 160, 44), None, "dot", lambda r: r.get("kept_singleton"))]


def _polyline(draw: ImageDraw.ImageDraw, points: list, colour: tuple, dash: tuple | None, width: int = 2) -> None:
    """Segments of a polyline, solid or dashed (the pattern runs on across the vertices)."""
    phase = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        length = ((x1 - x0) ** 2 + (y1 - y0) ** 2) ** 0.5
        if dash is None or length == 0:
            draw.line([(x0, y0), (x1, y1)], fill=colour, width=width)
            continue
        at = 0.0
        while at < length:
            period = dash[0] + dash[1]
            on = dash[0] - phase % period
            if on > 0:
                end = min(at + on, length)
                draw.line([(x0 + (x1 - x0) * at / length, y0 + (y1 - y0) * at / length),
                           (x0 + (x1 - x0) * end / length, y0 + (y1 - y0) * end / length)], fill=colour,
                          width=width)
                step = end - at
            else:
                step = min(period - phase % period, length - at)
            at += step
            phase += step


def _marker(draw: ImageDraw.ImageDraw, centre: tuple, shape: str, colour: tuple) -> None:
    """From the largest to the smallest: a ring (r 7), a square (5), a diamond (4), a dot (2)."""
    x, y = centre
    if shape == "ring":
        draw.ellipse([x - 7, y - 7, x + 7, y + 7], outline=colour, width=2)
    elif shape == "square":
        draw.rectangle([x - 5, y - 5, x + 5, y + 5], outline=colour, width=2)
    elif shape == "diamond":
        draw.polygon([(x, y - 4), (x + 4, y), (x, y + 4), (x - 4, y)], outline=colour, width=1)
    else:
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)


def plot_sweep(rows: list[dict], path: Path, chosen: float | None = None, note: str = "") -> None:
    """A line chart (pillow only): coverage and kept fractions (y, 0..1) against alpha (x), the ``chosen``
    (calibrated) alpha marked. Each curve has its own colour, dash and marker (nested shapes of different
    sizes), so curves that coincide stay apart and the legend shows each as drawn; nothing is blended."""
    width, height, left, right, top, bottom = 640, 420, 56, 170, 34, 44
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    x_max = max(r["alpha"] for r in rows)
    plot_w, plot_h = width - left - right, height - top - bottom

    def xy(alpha, value):
        return left + alpha / x_max * plot_w, top + (1 - value) * plot_h

    draw.rectangle([left, top, left + plot_w, top + plot_h], outline=(0, 0, 0))
    for i in range(6):
        v = i / 5
        y = top + (1 - v) * plot_h
        draw.line([left - 4, y, left, y], fill=(0, 0, 0))
        draw.line([left + 1, y, left + plot_w - 1, y], fill=(230, 230, 230))
        draw.text((8, y - 6), f"{v:.1f}", fill=(0, 0, 0), font=font)
        a = x_max * i / 5
        x = left + plot_w * i / 5
        draw.line([x, top + plot_h, x, top + plot_h + 4], fill=(0, 0, 0))
        draw.text((x - 12, top + plot_h + 8), f"{a:.2f}", fill=(0, 0, 0), font=font)
    draw.text((left + plot_w / 2 - 40, height - 18), "alpha (miscoverage)", fill=(0, 0, 0), font=font)
    draw.text((4, top - 16), "fraction", fill=(0, 0, 0), font=font)
    draw.text((left, 4), "Pooled (paper-mode) threshold against alpha: coverage of labeled pixels and unlabeled "
              "pixels kept", fill=(0, 0, 0), font=font)
    if chosen is not None and 0 < chosen <= x_max:
        x = xy(chosen, 0)[0]
        _polyline(draw, [(x, top), (x, top + plot_h)], (0, 0, 0), (4, 4), width=1)
        draw.text((x + 3, top + 2), note or f"alpha {chosen:g}", fill=(0, 0, 0), font=font)
    for i, (label, colour, dash, marker, value) in enumerate(SERIES):
        points = [xy(r["alpha"], value(r)) for r in rows if value(r) is not None]
        _polyline(draw, points, colour, dash)
        y = top + 10 + 18 * i
        _polyline(draw, [(width - right + 6, y), (width - right + 34, y)], colour, dash)
        _marker(draw, (width - right + 20, y), marker, colour)
        draw.text((width - right + 40, y - 6), label, fill=(0, 0, 0), font=font)
    for label, colour, dash, marker, value in SERIES:  # after every line: coinciding curves keep their marks
        for r in rows:
            if value(r) is not None:
                _marker(draw, xy(r["alpha"], value(r)), marker, colour)
    save_png(image, path)


def load_histograms(path: Path) -> dict:
    try:
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise UserError(f"{path}: no saved histograms; run `conformalsam calibrate` first") from None


def run_inspect(config, ids: list[str] | None = None, count: int = 6, seed: int = 0, split: str = "unlabeled",
                checkpoint: Path | None = None, alphas=None) -> dict:
    """Contact sheets for chosen (or ``count`` random) images of a split, the per-class table and the sweep."""
    work = config.work_dir
    record = read_calibration(work, required=True)
    dataset, store = Dataset(config), LogitsStore(work / "logits.zarr")
    samples = {s.id: s for s in dataset.split(split) if s.id in store}
    if ids:
        unknown = [i for i in ids if i not in samples]
        if unknown:
            raise UserError(f"--ids: {unknown[0]} is not a scored image of the {split} split")
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
    written = []
    for sample in chosen:
        label, raw, _, _ = filtered_mask(store, sample.id, q, record["rule"], background_index(dataset.classes))
        image = read_image(sample.image)
        masks = [("raw argmax", raw.numpy().astype(np.uint8)), (f"filtered (alpha {record['alpha']})",
                                                                label.numpy().astype(np.uint8))]
        if sample.mask is not None and sample.mask.is_file():
            masks.append(("ground truth", dataset.read_mask(sample.mask, image.shape[:2])))
        if model is not None:
            masks.append((predicted, _predict(model, image)))
        tiles = [("image", image)] + [(caption, colourise(m)) for caption, m in masks]
        legend = legend_of(dataset.classes, [m for _, m in masks])
        save_png(contact_sheet(tiles, legend), out / f"{sample.id}.png")
        written.append(out / f"{sample.id}.png")
    rows = alpha_sweep(load_histograms(work / HISTOGRAMS), alphas or [a / 100 for a in range(1, 51)])
    if rows:
        plot_sweep(rows, out / "alpha-sweep.png", record["alpha"], f"calibrated: alpha {record['alpha']:g}, "
                   f"{record['mode']} mode")
    return {"sheets": written, "sweep": rows, "record": record, "sweep_png": out / "alpha-sweep.png"}


@torch.no_grad()
def _predict(model, image: np.ndarray) -> np.ndarray:
    return model(to_tensor(image)[None]).argmax(1)[0].numpy().astype(np.uint8)
