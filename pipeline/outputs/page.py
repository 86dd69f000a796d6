"""`<work>/inspect/index.html`: a page of the masks, static files with relative links (copy the folder anywhere).

It shows which calibration made the masks, the alpha sweep, the class legend with the share of each class's
raw-argmax pixels that the unlabeled masks keep (the number that tells a class is being erased), and rows of
pictures: image | raw argmax | filtered mask | ground truth (where the split has it), with the kept share and,
against ground truth, the accuracy of the kept labels. Unlabeled rows are the masks on disk: those the filter
emptied most, least, and random ones; labeled and val rows are computed from the store with the same thresholds.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.atomic import atomic_write, write_text_atomic
from pipeline.data.datasets import Dataset, Sample, read_image
from pipeline.labels import IGNORE, IGNORE_COLOUR, PALETTE, colourise
from pipeline.stage0.store import LogitsStore
from pipeline.stage1.calibrate import filtered_mask, thresholds_of
from pipeline.stage1.conformal import background_index
from pipeline.stage1.rawscore import raw_argmax
from pipeline.stage1.record import MASKS
from pipeline.ui import no_progress

PAGE = "index.html"
PICTURES = "images"

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; }
td, th { padding: 2px 8px; text-align: right; border-bottom: 1px solid #ddd; }
td:nth-child(2), th:nth-child(2) { text-align: left; }
.swatch { display: inline-block; width: 14px; height: 14px; border: 1px solid #888; vertical-align: middle; }
.bar { display: inline-block; height: 10px; background: #4a7; vertical-align: middle; }
.low td { background: #fde2e2; }
.low .bar { background: #c55; }
.row { display: flex; gap: 6px; align-items: flex-start; margin: 4px 0 14px; flex-wrap: wrap; }
.row figure { margin: 0; }
.row img { height: 180px; image-rendering: pixelated; display: block; }
figcaption, .caption { font-size: 12px; color: #555; }
.broken { color: #b00; font-weight: bold; }
.figures { display: flex; gap: 24px; flex-wrap: wrap; align-items: flex-start; }
.figures img { max-width: 640px; width: 100%; }
"""

# Says on the page itself when a picture is missing (a folder copied in part).
CHECK = """
window.addEventListener("load", () => {
  const broken = [...document.images].filter(i => !i.complete || i.naturalWidth === 0);
  const note = document.getElementById("broken");
  note.textContent = broken.length ? broken.length + " picture(s) did not load: " +
    broken.map(i => i.getAttribute("src")).join(", ") : "";
});
"""


def write_page(out: Path, record: dict, store: LogitsStore, dataset: Dataset, count: int, seed: int,
               figures: dict[str, Path], work: Path, progress=None, predictor=None, sheets=()) -> Path:
    """Write ``out/index.html`` and its pictures (under ``out/images``); ``figures`` maps a heading to a
    figure already in ``out``; ``predictor``: (caption, image -> labels) of a trained model, a column of every
    row; ``sheets``: contact sheets in ``out``, linked. Returns the page's path."""
    rng = np.random.default_rng(seed)
    unscored = ""
    q, background = thresholds_of(record), background_index(dataset.classes)
    written: set[Path] = set()
    body = [f"<h1>Filtered masks: {html.escape(str(work))}</h1>", _calibration(record),
            '<p id="broken" class="broken"></p>']
    body.append(_classes(record))
    body.append('<div class="figures">' + "".join(
        f'<div><h2>{html.escape(heading)}</h2><img src="{figure.name}" alt="{html.escape(heading)}"></div>'
        for heading, figure in figures.items()) + "</div>")

    unlabeled = [s for s in dataset.split("unlabeled") if (work / MASKS / f"{s.id}.png").is_file() and s.id in store]
    kept = _kept_shares(work, unlabeled, progress)
    order = np.argsort([kept[s.id] for s in unlabeled], kind="stable")
    emptied, full = [unlabeled[i] for i in order[:count]], [unlabeled[i] for i in order[::-1][:count]]
    shown = {s.id for s in emptied + full}
    rest = [s for s in unlabeled if s.id not in shown]
    random = [rest[i] for i in sorted(rng.permutation(len(rest))[:count])]
    groups = [("Unlabeled: the masks the filter emptied most", "most", emptied),
              ("Unlabeled: the masks it emptied least", "least", full),
              ("Unlabeled: random masks", "random", random)]
    val = dataset.config.val
    for split in ("labeled", "val"):
        listed = split == "labeled" or (val is not None and Path(val).is_file())  # inspect needs no val list
        samples = [s for s in dataset.split(split) if s.id in store] if listed else []
        picked = [samples[i] for i in sorted(rng.permutation(len(samples))[:count])]
        if picked:
            groups.append((f"{split.capitalize()}: masks of the same thresholds, with ground truth" + (
                " (the thresholds were fitted on these images: their accuracies are in-sample, optimistic)"
                if split == "labeled" else ""), split, picked))
        elif split == "val" and val is not None:
            unscored = ("<p>Val images: none scored (<code>conformalsam logits --split val</code> adds them here).</p>"
                        if listed else f"<p>Val images: the val list {html.escape(str(val))} is not there.</p>")
    for heading, tag, samples in groups:
        body.append(f"<h2>{html.escape(heading)}</h2>")
        if not samples:
            body.append("<p>none</p>")
        for i, sample in enumerate(samples):
            on_disk = work / MASKS / f"{sample.id}.png" if tag in ("most", "least", "random") else None
            body.append(_row(out, f"{tag}-{i}", sample, dataset, store, q, record["rule"], background, on_disk,
                             written, predictor))
    body.append(unscored)
    if sheets:
        body.append("<h2>Contact sheets</h2><p>" + ", ".join(
            f'<a href="{p.relative_to(out).as_posix()}">{html.escape(p.stem)}</a>' for p in sheets) + "</p>")
    for stale in (out / PICTURES).glob("*"):
        if stale not in written:
            stale.unlink()
    page = out / PAGE
    write_text_atomic(page, "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                      f"<title>conformalsam masks</title><style>{STYLE}</style></head>\n<body>\n"
                      + "\n".join(body) + f"\n<script>{CHECK}</script>\n</body></html>\n")
    return page


def _calibration(record: dict) -> str:
    unlabeled = record["diagnostics"].get("unlabeled") or {}
    store = record.get("store") or {}
    kept = unlabeled.get("kept_fraction")
    qhat = record["qhat"]
    threshold = (f"threshold qhat {qhat:.4f}: a class enters a pixel's set when its probability is at least "
                 f"{1 - qhat:.4f}" if not isinstance(qhat, dict) else
                 "a threshold per class (calibration.json's qhat)")
    return (f"<p>Calibration: <b>{html.escape(record['mode'])} mode, {html.escape(record['rule'])} rule, alpha "
            f"{record['alpha']:g}</b>, fitted on {record['n_images']} labeled images ({record['created']}); "
            f"{threshold}. Scores of the {html.escape(str(store.get('backend')))} backend "
            f"({html.escape(str(store.get('model_id') or ''))}). {unlabeled.get('images', 0)} unlabeled masks keep "
            f"{'-' if kept is None else f'{kept:.1%}'} of their pixels; ignore (255) is white.</p>")


def _classes(record: dict) -> str:
    """The legend, with each class's kept share over every unlabeled mask (calibrate's own count)."""
    unlabeled = record["diagnostics"].get("unlabeled") or {}
    per_class, overall = unlabeled.get("per_class") or {}, unlabeled.get("kept_fraction")
    precision = (unlabeled.get("quality") or {}).get("per_class_precision") or {}
    rows = []
    for c, name in enumerate(record["classes"]):
        figures = per_class.get(name) or {}
        share = figures.get("kept_fraction")
        low = share is not None and overall and share < overall / 2
        bar = "" if share is None else f'<span class="bar" style="width:{round(share * 120)}px"></span> {share:.1%}'
        rows.append(f'<tr{" class=low" if low else ""}><td><span class="swatch" style="background:'
                    f'rgb{tuple(int(v) for v in PALETTE[c])}"></span></td><td>{html.escape(name)}</td>'
                    f"<td>{figures.get('raw_pixels', '-')}</td><td style=\"text-align:left\">{bar}</td>"
                    f"<td>{figures.get('filtered_pixels', '-')}</td><td>{_percent(precision.get(name))}</td></tr>")
    rows.append(f'<tr><td><span class="swatch" style="background:rgb{IGNORE_COLOUR}"></span></td>'
                "<td>ignore (255)</td><td></td><td></td><td></td><td></td></tr>")
    return ("<h2>Classes</h2><p>Over every unlabeled mask. Kept share: of the pixels whose raw argmax is the class, "
            "the share the filtered masks keep (red: under half the overall share, the filter is erasing the class). "
            "Precision: of the pixels the masks give the class, the share whose ground truth is the class (where the "
            "unlabeled images have ground truth).</p><table><tr><th></th><th>class</th><th>raw argmax pixels</th>"
            "<th style=\"text-align:left\">kept share</th><th>pixels given the class</th><th>precision</th></tr>"
            + "".join(rows) + "</table>")


def _percent(value) -> str:
    return "-" if value is None else f"{value:.1%}"


def _kept_shares(work: Path, samples: list[Sample], progress) -> dict[str, float]:
    """Each unlabeled mask's kept share, read from its PNG on disk."""
    shares = {}
    with (progress or no_progress)("masks read") as update:
        update(0, len(samples))
        for sample in samples:
            with Image.open(work / MASKS / f"{sample.id}.png") as img:
                shares[sample.id] = float((np.asarray(img) != IGNORE).mean())
            update(1)
    return shares


def _row(out: Path, stem: str, sample: Sample, dataset: Dataset, store: LogitsStore, q, rule: str, background,
         on_disk: Path | None, written: set, predictor=None) -> str:
    image = read_image(sample.image)
    if on_disk is not None:  # the mask the trainer reads, beside the annotator's argmax
        with Image.open(on_disk) as img:
            label = np.asarray(img)
        raw = raw_argmax(store, sample.id)
    else:
        label, raw, _, _ = filtered_mask(store, sample.id, q, rule, background)
        label = label.numpy()
    truth = dataset.read_mask(sample.mask, image.shape[:2]) if sample.mask is not None and sample.mask.is_file() \
        else None
    tiles = [("image", "image", image), ("raw", "raw argmax", colourise(raw.numpy().astype(np.uint8))),
             ("filtered", "filtered", colourise(label))]  # (file name, caption, picture)
    if truth is not None:
        tiles.append(("truth", "ground truth", colourise(truth)))
    if predictor is not None:
        tiles.append(("prediction", f"prediction: {predictor[0]}", colourise(predictor[1](image))))
    figures = []
    for name, caption, picture in tiles:
        path = out / PICTURES / f"{stem}-{name}.{'jpg' if name == 'image' else 'png'}"
        save_picture(picture, path)
        written.add(path)
        said = html.escape(caption)
        figures.append(f'<figure><img src="{PICTURES}/{path.name}" alt="{said}"><figcaption>{said}</figcaption>'
                       "</figure>")
    kept = label != IGNORE
    said = [html.escape(sample.id), f"kept {kept.mean():.1%}"]
    if truth is not None:
        scored = kept & (truth != IGNORE)
        said.append("accuracy of kept labels " + (f"{(label[scored] == truth[scored]).mean():.1%}" if scored.any()
                                                  else "-"))
    return f'<div class="caption">{" · ".join(said)}</div><div class="row">{"".join(figures)}</div>'


def save_picture(picture: Image.Image | np.ndarray, path: Path) -> None:
    """An image (or an RGB array) written atomically, as JPEG or PNG by the path's suffix."""
    if isinstance(picture, np.ndarray):
        picture = Image.fromarray(np.ascontiguousarray(picture))
    path.parent.mkdir(parents=True, exist_ok=True)
    jpeg = path.suffix == ".jpg"
    with atomic_write(path) as tmp:
        picture.save(tmp, format="JPEG" if jpeg else "PNG", **({"quality": 90} if jpeg else {}))
