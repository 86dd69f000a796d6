"""`pytorch` backend factories: ESPNetv2 trained on Cityscapes, from the user's own checkout of
sacmehta/EdgeNets (MIT), named by foundation.code. Nothing of EdgeNets is in this project: its code is
imported from that checkout at run time and its weights come from the file foundation.weights names.

``build`` is the width-2.0 network (the presets' annotator); ``build_s1_5``, ``build_s1_0`` and ``build_s0_5``
the narrower ones EdgeNets also publishes (weaker annotators, `make bench-student`)."""

import contextlib
import io
from argparse import Namespace

CITYSCAPES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
              "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
              "background")  # its 20 output channels, in order


def build(scale: float = 2.0):
    from model.segmentation.espnetv2 import espnetv2_seg  # EdgeNets' own builder

    with contextlib.redirect_stdout(io.StringIO()):  # it announces "training from scratch": the weights come next
        return espnetv2_seg(Namespace(classes=len(CITYSCAPES), s=scale, weights="", dataset="city", channels=3))


def build_s1_5():
    return build(1.5)


def build_s1_0():
    return build(1.0)


def build_s0_5():
    return build(0.5)
