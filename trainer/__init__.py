"""The lean trainer: stage I on labeled images + the cached filtered masks, stage II with a semi-supervised
method of `trainer/methods/` (self-training or UniMatch), evaluation."""
