"""A `--model` factory: ESPNetv2 as a student network, to start from EdgeNets' PASCAL VOC segmentation weights
(`--init-weights espnetv2_s_<width>_pascal_384x384.pth`): a network pretrained on another domain and label set,
which has never seen a street. Built by EdgeNets' own code from the user's checkout (`--model-code`); nothing of
EdgeNets is in this project.

The decoder keeps PASCAL's geometry (its widths follow the class count: built for 21 classes) and only the last
1x1 convolution outputs ``classes`` channels, so `--init-weights` re-initialises exactly that classifier. The
encoder (``base_net``) is the ``backbone``: it trains at the base learning rate, the decoder at head_lr_mult x.
The network needs sides divisible by 16: other inputs are padded and the logits cropped back."""

import contextlib
import io
from argparse import Namespace

import torch.nn.functional as F
from torch import nn

PASCAL_CLASSES = 21
STRIDE = 16


def build(classes: int, width: float = 1.0):
    from model.segmentation.espnetv2 import ESPNetv2Segmentation  # EdgeNets' own network

    class Student(ESPNetv2Segmentation):
        @property
        def backbone(self):
            return self.base_net

        def forward(self, x):
            h, w = x.shape[-2:]
            pad_h, pad_w = -h % STRIDE, -w % STRIDE
            out = super().forward(F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x)
            return out[..., :h, :w]

    args = Namespace(classes=PASCAL_CLASSES, s=width, weights="", dataset="pascal", channels=3)
    with contextlib.redirect_stdout(io.StringIO()):  # it announces "training from scratch": weights come later
        model = Student(args, classes=PASCAL_CLASSES, dataset="pascal")
    head = model.bu_dec_l4.merge_layer[-1]  # the 1x1 convolution to the class logits
    model.bu_dec_l4.merge_layer[-1] = nn.Conv2d(head.in_channels, classes, 1, bias=head.bias is not None)
    return model


def build_s0_5(classes: int):
    return build(classes, 0.5)


def build_s2_0(classes: int):
    return build(classes, 2.0)
