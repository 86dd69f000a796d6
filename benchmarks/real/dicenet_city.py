"""`pytorch` backend factories: DiCENet trained on Cityscapes (narrow widths: weak annotators, `make
bench-student`), from the user's own checkout of sacmehta/EdgeNets (MIT), named by foundation.code. Nothing of
EdgeNets is in this project. The published weights' dimension-wise convolutions were built for a 224 x 224
input (their shapes say so), and the network is fed the camvid presets' 512 x 1024 as ESPNetv2 is. Its 20
outputs are those of espnetv2_city.py (CITYSCAPES)."""

import contextlib
import io
from argparse import Namespace

CLASSES = 20  # the 19 Cityscapes classes + background


def build(scale: float = 0.5):
    from model.segmentation.dicenet import dicenet_seg  # EdgeNets' own builder

    args = Namespace(s=scale, weights="", channels=3, model_width=224, model_height=224, dataset="city")
    with contextlib.redirect_stdout(io.StringIO()):  # it announces "training from scratch": the weights come next
        return dicenet_seg(args, classes=CLASSES)


def build_s0_75():
    return build(0.75)
