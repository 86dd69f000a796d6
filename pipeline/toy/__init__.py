"""The embedded toy world: a generated data set and a small annotator that stand in for a real data set and SEEM."""

from pathlib import Path

# The toy annotator's weights ship inside the package (the project's one deliberate binary): the toy preset reads
# them from here, in a checkout and in an installed wheel alike.
SHIPPED_ANNOTATOR = Path(__file__).resolve().parent / "annotator.pt"
