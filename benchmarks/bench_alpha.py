"""`make bench-alpha` / `make bench-alpha-real`: what alpha is worth to the student, measured by training.

The ground truth a rule for choosing alpha from the labeled set must predict: stage I trained on the masks of
each alpha of a grid, per CP mode (pooled `paper` with the paper's rule; `crc` over images with the singleton
rule), per labeled split, over seeds; with the benchmarks' world, recipe and schedule (benchmarks/ablation.py:
bench-quality's toy world, bench-real's CamVid). The references (labeled only, raw annotator masks, stage II)
are those benchmarks' own rows: the same recipe and seeds train the same networks.

Variants whose masks come out identical (an alpha at which the filter keeps every pixel gives the raw argmax)
are trained once: training is deterministic on the CPU, so the run would only repeat itself. Finished runs
are reused, also the ablation's own (same folders), so an interrupted grid continues where it stopped.

Writes <out>/alpha-<world>.json (every figure) and .md (the tables), and prints the tables.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
from ablation import World, calibrate_variant, make_store, recipes, split_config, train_all  # noqa: E402
from bench_quality import TOY  # noqa: E402
from bench_real import CAMVID  # noqa: E402
from pipeline import PROJECT_ROOT  # noqa: E402
from pipeline.atomic import write_text_atomic  # noqa: E402
from pipeline.stage1.alpha_rules import RULES, choose, scores as alpha_scores  # noqa: E402
from pipeline.stage1.calibrate import Settings, accumulate, assign_folds  # noqa: E402
from pipeline.data.datasets import Dataset  # noqa: E402
from pipeline.stage1.held_out import held_out  # noqa: E402
from pipeline.stage0.store import LogitsStore  # noqa: E402
from pipeline.stage1.record import MASKS, SUMS_FILE  # noqa: E402

# From "filters nothing" to "keeps about half" on each world (the masks tables show where each lands).
# crc needs at least 1/alpha - 1 labeled images: the toy world's 16-image split starts at 0.06.
GRIDS = {
    "quality": {"paper": (0.05, 0.1, 0.2, 0.3, 0.5), "crc": (0.06, 0.1, 0.2, 0.3, 0.4)},
    "real": {"paper": (0.05, 0.15, 0.2, 0.3, 0.5), "crc": (0.05, 0.1, 0.2, 0.3, 0.4)},
}
RULE = {"paper": "paper", "crc": "singleton"}  # each mode with the rule the ablation pairs it with
WORLDS = {"toy": TOY, "camvid": CAMVID}


def grid_variants(world: World, grid: dict[str, tuple[float, ...]]) -> dict[str, Settings]:
    """The ablation's variants first (their finished runs stand for the grid's identical masks), then the grid."""
    variants = dict(world.variants)
    for mode, alphas in grid.items():
        variants.update({f"{mode}-{a:g}": Settings(alpha=a, mode=mode, rule=RULE[mode]) for a in alphas})
    return variants


def masks_digest(work: Path) -> str:
    """Identifies a variant's masks by content (calibrate's per-mask CRC-32 sums)."""
    sums = json.loads((work / MASKS / SUMS_FILE).read_text())
    return hashlib.sha256(json.dumps(sorted(sums.items())).encode()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("world", choices=sorted(WORLDS))
    parser.add_argument("--splits", nargs="+")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2, help="trainings run side by side (one thread each)")
    parser.add_argument("--masks-only", action="store_true", help="calibrate every variant, print, train nothing")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "work" / "bench")
    args = parser.parse_args()
    world: World = WORLDS[args.world]
    args.splits = args.splits or list(world.splits)
    args.epochs, args.crop, args.eval_from = world.epochs, world.crop, world.eval_from
    variants = grid_variants(world, GRIDS[world.name])
    root = (args.out / world.name).resolve()
    started = time.perf_counter()
    make_store(world, root, args.splits)

    masks, owner = {}, {}  # owner[split, variant]: the variant whose training stands for it (same masks)
    for split in args.splits:
        first_of = {}
        for variant, settings in variants.items():
            masks[split, variant] = calibrate_variant(world, root, split, variant, settings)
            digest = masks_digest(split_config(world, root, split, variant).work_dir)
            owner[split, variant] = first_of.setdefault(digest, variant)
    print(f"scores and calibrations ready after {time.perf_counter() - started:.0f}s", flush=True)
    if args.masks_only:
        print(render(world, variants, masks, owner, {}, args))
        return

    jobs = []  # one per distinct set of masks in the grid (its owner's run: possibly the ablation's own)
    for split in args.splits:
        owners = {owner[split, v] for v in variants if v not in world.variants}
        for seed in range(args.seeds):
            base, _ = recipes(world, args, seed)
            jobs += [(world, root, split, seed, v, v, 1, base, f"seed{seed}", "self") for v in variants if v in owners]
    results = train_all([jobs], args.jobs, started)
    took = (time.perf_counter() - started) / 60
    report = {"world": world.title, "splits": args.splits, "seeds": args.seeds, "epochs": world.epochs[0],
              "minutes": took, "variants": {v: vars(s) for v, s in variants.items()},
              "rows": {split: {v: {**{k: masks[split, v][k] for k in ("kept", "acc_kept", "miou_kept")},
                                   "trained_as": owner[split, v], "miou": results.get((split, owner[split, v]))}
                               for v in variants} for split in args.splits}}
    report["rules"] = {split: {mode: judge_rules(world, root, split, mode, alphas, report["rows"][split])
                               for mode, alphas in GRIDS[world.name].items()} for split in args.splits}
    write_text_atomic(args.out / f"alpha-{world.name}.json", json.dumps(report, indent=1) + "\n")
    text = render(world, variants, masks, owner, results, args) + f"\n{args.seeds} seeds, stage I only " \
        f"({world.epochs[0]} epochs, crop {world.crop}), took {took:.1f} min\n\n" + render_rules(report)
    write_text_atomic(args.out / f"alpha-{world.name}.md", text)
    print(text)


def judge_rules(world: World, root: Path, split: str, mode: str, alphas, rows: dict) -> dict:
    """Each rule's scores of the grid's alphas from the labeled set alone, against the students trained on them:
    rank correlation, the alpha it picks, the student mIoU lost against the best alpha, and whether the pick is
    within the best alpha's seed spread (its mean at least the best alpha's lowest seed)."""
    settings = Settings(alpha=alphas[0], mode=mode, rule=RULE[mode])
    config = split_config(world, root, split, f"{mode}-{alphas[0]:g}")
    dataset, store = Dataset(config), LogitsStore(config.work_dir / "logits.zarr")
    labeled = list({s.id: s for s in dataset.split("labeled")}.values())
    hist = accumulate(store, dataset, labeled, settings, jobs=2)
    held = held_out(store, dataset, labeled, assign_folds(labeled, settings), hist, mode, RULE[mode], alphas, 2)
    students = {a: rows[f"{mode}-{a:g}"]["miou"] for a in alphas}
    means = np.array([np.mean(students[a]) for a in held.alphas])
    best = int(np.argmax(means))
    judged = {"alphas": list(held.alphas), "student_mean": means.tolist(), "top1_accuracy": held.top1_accuracy,
              "held_out_kept": held.kept.tolist(), "held_out_accuracy": held.accuracy.tolist(),
              "best_alpha": held.alphas[best], "rules": {}}
    for rule in RULES:
        score = alpha_scores(held, rule)
        pick = choose(held, rule)
        judged["rules"][rule] = {"scores": score.tolist(), "spearman": rank_correlation(score, means),
                                 "alpha": held.alphas[pick], "lost": float(means[best] - means[pick]),
                                 "within_spread": bool(means[pick] >= min(students[held.alphas[best]]))}
    return judged


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman's rho (average ranks for ties); None when either side is constant."""
    def ranks(x):
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=np.float64)
        for value in np.unique(x):  # ties share their mean rank
            r[x == value] = r[x == value].mean()
        return r
    ra, rb = ranks(np.asarray(a, float)), ranks(np.asarray(b, float))
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def render_rules(report: dict) -> str:
    lines = ["Rules that choose alpha from the labeled set alone (cross-calibrated pseudo-labels of the labeled "
             "images), against the students: Spearman rank correlation of the rule's scores with the mean student "
             "mIoU over the grid, the alpha it picks, and the mIoU lost against the best alpha (* = within the best "
             "alpha's seed spread).", "",
             "| rule | " + " | ".join(f"{split} {mode}" for split in report["rules"] for mode in report["rules"][split])
             + " |", "|---|" + "---|" * sum(len(m) for m in report["rules"].values())]
    cells = [(split, mode) for split in report["rules"] for mode in report["rules"][split]]
    best = [report["rules"][s][m] for s, m in cells]
    lines.append("| best alpha (trained) | " + " | ".join(f"{j['best_alpha']:g}: {100 * max(j['student_mean']):.1f}"
                                                         for j in best) + " |")
    for rule in RULES:
        row = []
        for judged in best:
            r = judged["rules"][rule]
            rho = "-" if r["spearman"] is None else f"{r['spearman']:+.2f}"
            row.append(f"rho {rho}, {r['alpha']:g}, -{100 * r['lost']:.1f}{'*' if r['within_spread'] else ''}")
        lines.append(f"| {rule} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def render(world: World, variants: dict, masks: dict, owner: dict, results: dict, args) -> str:
    def cell(values):
        if not values:
            return "-"
        v = 100 * np.array(values)
        return f"{v.mean():.1f} ({v.min():.1f}-{v.max():.1f})"

    lines = [f"{world.title}: stage I val mIoU % (best epoch, mean over seeds, min-max) against alpha; the masks "
             "of the unlabeled images against their ground truth.", "",
             "| labeled | masks | kept pixels % | pixel acc. % on kept | mIoU % on kept | student val mIoU % |",
             "|---|---|---|---|---|---|"]
    for split in args.splits:
        for variant in (v for v in variants if v == "raw" or v not in world.variants):
            m = masks[split, variant]
            same = "" if owner[split, variant] == variant else f" (= {owner[split, variant]})"
            lines.append(f"| {split} | {variant}{same} | {100 * m['kept']:.1f} | {100 * m['acc_kept']:.1f} | "
                         f"{100 * m['miou_kept']:.1f} | {cell(results.get((split, owner[split, variant])))} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
