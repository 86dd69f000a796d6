"""conformalsam pipeline: dataset layer, foundation-model scores, conformal calibration."""

from pathlib import Path

__version__ = "0.1.0"

# The checkout this package lives in: built-in presets (the toy world) resolve against it.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
