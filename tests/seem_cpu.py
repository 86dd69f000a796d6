"""Running the real SEEM on a machine without CUDA, for `make test-seem` and `make bench-seem` only.

Two redirects, never in the product: SEEM creates a tensor on the current CUDA device while building
(`torch.cuda.current_device` answers "cpu" here), and PyPI's torchvision is a CUDA build whose C++ ops
cannot load beside a CPU-only torch (its op schemas are declared so that it imports; SEEM's semantic
inference calls none of them).
"""

from __future__ import annotations

import sys

import torch

_LIBRARIES = []  # a torch.library.Library lives as long as it is referenced


def declare_torchvision_ops() -> None:
    try:
        import torchvision  # noqa: F401
    except RuntimeError as exc:
        if "torchvision::nms does not exist" not in str(exc):
            raise
        for name in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
            del sys.modules[name]
        lib = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _LIBRARIES.append(lib)


def redirect_cuda_build(monkeypatch) -> None:
    """SEEM's builder asks for the current CUDA device; without CUDA it gets the CPU."""
    if not torch.cuda.is_available():
        monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
