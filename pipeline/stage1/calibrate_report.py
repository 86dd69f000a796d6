"""The calibration record (calibration.json) as rich tables: thresholds, coverage, what the masks kept."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from pipeline.ui import percent, print_table


def print_report(record: dict, console: Console) -> None:
    classes = record["classes"]
    cross = record["diagnostics"]["cross_calibration"]
    unlabeled = record["diagnostics"].get("unlabeled")
    filters = record["rule"] != "argmax"  # the argmax rule keeps every pixel: no threshold, coverage or set applies
    if filters:
        _print_threshold(record, cross, console)
    else:
        console.print(f"rule argmax: the masks are the annotator's argmax with every pixel kept (no conformal "
                      f"filtering; {record['mode']} mode and alpha {record['alpha']} do not change them)",
                      highlight=False)
    held = record["diagnostics"].get("held_out")
    if filters and held and held["kept_fraction"] is not None:
        console.print(f"held out by fold, the labeled images' masks keep {percent(held['kept_fraction'])}% of pixels, "
                      f"{percent(held['kept_accuracy'])}% of them right (the annotator's argmax: "
                      f"{percent(held['top1_accuracy'])}% right)", highlight=False)

    table = Table(title="per class")
    table.add_column("class")
    table.add_column("calib. pixels", justify="right")
    if filters:
        table.add_column("coverage %", justify="right")
    if unlabeled:
        table.add_column("kept % (of raw argmax)", justify="right")
        quality = unlabeled.get("quality")
        if quality:
            table.add_column("IoU % raw", justify="right")
            table.add_column("IoU % kept", justify="right")
    for name in classes:
        row = [name, str(record["n_pixels"][name])] + ([percent(cross["per_class"][name])] if filters else [])
        if unlabeled:
            row.append(percent(unlabeled["per_class"][name]["kept_fraction"]))
            if unlabeled.get("quality"):
                iou = unlabeled["quality"]["per_class_iou"][name]
                row += [percent(iou["raw"]), percent(iou["filtered_kept"])]
        table.add_row(*row)
    print_table(table, console)
    if not unlabeled:
        return
    sizes = unlabeled["set_size_histogram"]
    total = max(1, sum(sizes))
    shown = ", ".join(f"{k}: {100 * n / total:.1f}%" for k, n in enumerate(sizes) if n)
    console.print(f"unlabeled: {unlabeled['images']} images, kept {percent(unlabeled['kept_fraction'])}% of pixels"
                  + (f"; set sizes {shown}" if filters else ""), highlight=False)
    quality = unlabeled.get("quality")
    if quality:
        table = Table(title="pseudo-label quality on the unlabeled set (its ground truth)")
        table.add_column("masks")
        table.add_column("mIoU %", justify="right")
        table.add_column("pixel acc. %", justify="right")
        for key, label in (("raw", "raw argmax"), ("filtered_kept", "filtered, kept pixels"),
                           ("filtered_overall", "filtered, ignore = miss")):
            table.add_row(label, percent(quality[key]["miou"]), percent(quality[key]["pixel_accuracy"]))
        print_table(table, console)


def _print_threshold(record: dict, cross: dict, console: Console) -> None:
    qhat = record["qhat"]
    if isinstance(qhat, dict):
        threshold = "per class: " + ", ".join(f"{c} {q:.4f}" for c, q in qhat.items())
    else:
        threshold = f"{qhat:.4f} (class kept in a set when its probability >= {1 - qhat:.4f})"
    rank = record["rank"]
    units = f"k = {rank['k']} of n = {rank['n']} labeled pixels" if rank else f"{record['n_images']} images"
    console.print(f"{record['mode']} mode, alpha {record['alpha']}, rule {record['rule']}: "
                  f"qhat {threshold} ({units})", highlight=False)
    if record["fallbacks"]:
        console.print("too few calibration pixels for a class threshold; pooled threshold used for: "
                      f"{', '.join(record['fallbacks'])}", style="yellow")
    console.print(f"cross-calibration ({cross['folds']} folds of labeled images): pixel coverage "
                  f"{percent(cross['pixel_coverage'])}%, mean image coverage {percent(cross['image_coverage'])}% "
                  f"(target {percent(cross['target'])}%)", highlight=False)
