"""`make bench-quality`: the method's ablation on the toy world, averaged over seeds (benchmarks/ablation.py).

The `toy` recipe at crop 64 on a 12 + 4 epoch schedule, validated over the last 30% of each stage's epochs,
so the whole table fits in about 35 minutes on 2 CPU cores, two runs at a time with one thread each.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
from ablation import World, parse, run  # noqa: E402
from pipeline import PROJECT_ROOT, config as cfg  # noqa: E402
from pipeline.stage1.calibrate import Settings  # noqa: E402

SPLITS = PROJECT_ROOT / "data" / "toy" / "splits"


def toy_split(n: str):
    return replace(cfg.load("toy"), labeled=SPLITS / n / "labeled.txt", unlabeled=SPLITS / n / "unlabeled.txt")


# alpha 0.05 for the paper mode: the paper's best on VOC. crc stays at 0.1: at 0.05 it needs >= 19 labeled images.
TOY = World(name="quality", title="Toy world", config=toy_split, splits=("16", "64"), recipe="toy",
            variants={"raw": Settings(alpha=0.1, rule="argmax"), "paper": Settings(alpha=0.05, mode="paper"),
                      "crc": Settings(alpha=0.1, mode="crc", rule="singleton")}, plugin="crc",
            epochs=(12, 4), crop=64, eval_from=0.7)

if __name__ == "__main__":
    run(TOY, parse(TOY, __doc__))
