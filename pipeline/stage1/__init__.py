"""Stage 1: conformal calibration on the labeled images and the filtered masks of the unlabeled ones."""
