"""Figures with matplotlib: the alpha sweep of a calibration and the training curves of a work folder's runs.

Figures are drawn on matplotlib's Agg canvas (no display, no pyplot state) and written atomically as PNG,
with what they show (mode, rule, alpha) in the PNG's Title and Description text.
"""

from __future__ import annotations

import json
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from pipeline.atomic import atomic_write

CHOSEN = {"color": "black", "linestyle": "--", "linewidth": 1}


def save(figure: Figure, path: Path, title: str, description: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100, metadata={"Title": title, "Description": json.dumps(description)})


def plot_sweep(sweep: dict, path: Path) -> None:
    """Three panels against alpha, from the held-out diagnostics of the calibrated mode and rule (see
    `pipeline.outputs.inspect.sweep`): coverage against its target; the share of pixels kept (held-out labeled,
    and the unlabeled masks where one threshold makes them); the accuracy of the kept labels against the
    annotator's own top-1 accuracy. Each panel has its own y range, so differences of a point show; the
    calibrated alpha is marked in each."""
    rows, mode, rule, chosen = sweep["rows"], sweep["mode"], sweep["rule"], sweep["alpha"]
    alphas = [r["alpha"] for r in rows]
    figure = Figure(figsize=(7.5, 8.5), layout="constrained")
    cover, kept, accuracy = figure.subplots(3, 1, sharex=True)
    what = "per-image coverage (CRC's guarantee)" if mode == "crc" else "pixel coverage"
    cover.plot(alphas, [1 - a for a in alphas], color="grey", linestyle=":", label="target 1 - alpha")
    cover.plot(alphas, [r["coverage"] for r in rows], marker="o", markersize=3, label=f"{what}, cross-calibrated")
    cover.set_ylabel("coverage")
    kept.plot(alphas, [r["kept"] for r in rows], marker="o", markersize=3, color="tab:red",
              label="labeled pixels, held out")
    if any(r.get("kept_unlabeled") is not None for r in rows):
        kept.plot(alphas, [r.get("kept_unlabeled") for r in rows], marker="s", markersize=3, color="tab:orange",
                  label="unlabeled masks (one threshold)")
    kept.set_ylabel("share of pixels kept")
    accuracy.plot(alphas, [r["accuracy"] for r in rows], marker="o", markersize=3, color="tab:green",
                  label="kept labels, held out")
    accuracy.axhline(sweep["top1"], color="grey", linestyle=":", label="annotator's argmax, every pixel")
    accuracy.set_ylabel("accuracy of kept labels")
    accuracy.set_xlabel("alpha (miscoverage)")
    for axes in (cover, kept, accuracy):
        axes.yaxis.set_major_formatter(PercentFormatter(1.0))
        axes.axvline(chosen, **CHOSEN)
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small", loc="best")
    cover.annotate(f"calibrated: alpha {chosen:g}", (chosen, 1), xycoords=("data", "axes fraction"),
                   xytext=(4, -12), textcoords="offset points", fontsize="small")
    title = f"{mode} mode, {rule} rule, against alpha (calibrated: alpha {chosen:g})"
    figure.suptitle(title)
    save(figure, path, title, {"mode": mode, "rule": rule, "alpha": chosen})


def plot_training(runs: dict, path: Path) -> bool:
    """Val mIoU and training loss against the epoch, one line per run and stage; ``runs`` maps a run name to
    {stage folder: metrics.jsonl records}. Stage II's epochs follow its stage I's. False when nothing to draw."""
    figure = Figure(figsize=(8, 6.5), layout="constrained")
    miou, loss = figure.subplots(2, 1, sharex=True)
    drawn = 0
    for run, stages in sorted(runs.items()):
        first = stages.get("stage1") or []
        for stage, lines in sorted(stages.items()):
            if not lines:
                continue
            shift = first[-1]["epoch"] if stage != "stage1" and first else 0
            epochs = [x["epoch"] + shift for x in lines]
            label = f"{run}/{stage}"
            scored = [(e, x["miou"]) for e, x in zip(epochs, lines) if x.get("miou") is not None]
            if scored:
                miou.plot(*zip(*scored), marker="o", markersize=3, label=label)
            loss.plot(epochs, [x["loss"] for x in lines], marker="o", markersize=3, label=label)
            drawn += 1
    if not drawn:
        return False
    miou.set_ylabel("val mIoU")
    loss.set_ylabel("training loss (epoch mean)")
    loss.set_xlabel("epoch (stage II after its stage I)")
    miou.yaxis.set_major_formatter(PercentFormatter(1.0))
    for axes in (miou, loss):
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small", loc="best")
    figure.suptitle("training runs of the work folder: val mIoU and training loss per epoch")
    save(figure, path, "training runs", {"runs": sorted(runs)})
    return True
