"""conformalsam pipeline: dataset layer, foundation-model scores, conformal calibration."""

from pathlib import Path

__version__ = "0.1.0"

# The checkout this package lives in (its benchmarks, tests and Makefile); in an installed wheel, site-packages,
# which nothing reads from or writes to but the package itself.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
