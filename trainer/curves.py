"""TensorBoard curves of a run, written beside its checkpoints (``tensorboard --logdir work/runs``).

Per step: the loss terms, lambda and the learning rate; per epoch: images/s, val mIoU, pixel accuracy and
per-class IoU, and a few val images (image | prediction | ground truth). The x axis is the schedule's step, so
stage II's curves continue stage I's.

A resumed run reopens the folder with ``purge_step`` at the step after its checkpoint: TensorBoard's reader
drops what a killed run logged past that checkpoint, so no step is shown twice. Events are flushed before each
checkpoint is written, so every step a checkpoint holds is on disk with it.

TensorBoard is optional (``pip install 'conformalsam[tensorboard]'``); without it the run says so in one line
and trains on (metrics.jsonl holds the same per-epoch figures).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.labels import colourise
from trainer.augment import to_tensor
from trainer.evaluate import predict

EVENTS = "events.out.tfevents.*"
SHOWN = 3  # val images shown per evaluation
PICTURE_HEIGHT = 256


class Curves:
    """A run's TensorBoard writer; nothing is written for ``out`` None (ranks other than 0) or where TensorBoard is
    not installed. The event file is created at the first step: a run that fails before it leaves no folder."""

    hinted = False

    def __init__(self, out: Path | None, resume_step: int | None, log):
        """``resume_step``: the step of the checkpoint a resumed run continues from (None: a new run, whose
        earlier event files, of a run deleted or killed before its first checkpoint, go)."""
        self.writer = self.open = None
        if out is None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            if not Curves.hinted:  # once a process (`--stage all` trains two stages)
                log("TensorBoard is not installed: no curves for `tensorboard --logdir` (pip install "
                    "'conformalsam[tensorboard]'); metrics.jsonl has the per-epoch figures")
                Curves.hinted = True
            return
        if resume_step is None:
            for old in out.glob(EVENTS):
                old.unlink()
        self.open = lambda: SummaryWriter(str(out), purge_step=None if resume_step is None else resume_step + 1,
                                          flush_secs=30)

    def step(self, step: int, loss: float, sup: float, unsup: float, weight: float, lr: float) -> None:
        if self.open and not self.writer:
            self.writer = self.open()
        if self.writer:
            for tag, value in (("loss/total", loss), ("loss/supervised", sup), ("loss/unsupervised", unsup),
                               ("schedule/lambda", weight), ("schedule/lr", lr)):
                self.writer.add_scalar(tag, value, step)

    def epoch(self, step: int, record: dict, classes) -> None:
        """The epoch's speed and, when it was scored, its val figures."""
        if not self.writer:
            return
        self.writer.add_scalar("speed/images_per_s", record["images_per_s"], step)
        if record.get("miou") is None:
            return
        self.writer.add_scalar("val/miou", record["miou"], step)
        self.writer.add_scalar("val/pixel_accuracy", record["pixel_accuracy"], step)
        for name, iou in zip(classes, record["iou"]):
            if iou is not None:
                self.writer.add_scalar(f"val_iou/{name}", iou, step)

    def images(self, step: int, model, val_set, device, mode: str, crop: int, autocast=None) -> None:
        """The first val images beside the model's prediction and their ground truth, one picture each."""
        if not self.writer:
            return
        was_training = model.training
        model.eval()
        for index in range(min(SHOWN, len(val_set))):
            image, mask = val_set.dataset.load(val_set.samples[index])
            with autocast() if autocast else torch.autocast("cpu", enabled=False):
                label = predict(model, to_tensor(image)[None].to(device), mode, crop).argmax(1)[0].cpu().numpy()
            gap = np.full((image.shape[0], 4, 3), 255, np.uint8)  # white: the panels stay apart
            row = np.concatenate([image, gap, colourise(label.astype(np.uint8)), gap,
                                  colourise(mask.astype(np.uint8))], 1)
            if row.shape[0] > PICTURE_HEIGHT:  # a few KB a picture, not MB (Cityscapes' images are 1024 x 2048)
                width = round(row.shape[1] * PICTURE_HEIGHT / row.shape[0])
                row = np.asarray(Image.fromarray(row).resize((width, PICTURE_HEIGHT), Image.NEAREST))
            self.writer.add_image(f"val/{index}", row, step, dataformats="HWC")
        model.train(was_training)

    def flush(self) -> None:
        if self.writer:
            self.writer.flush()

    def close(self) -> None:
        if self.writer:
            self.writer.close()
