"""Work over many images in threads: torch and zlib release the GIL, so threads share one copy of the store."""

from __future__ import annotations

import torch
from joblib import Parallel, delayed


def in_threads(work, samples: list, jobs: int) -> list:
    """Run ``work`` on ``jobs`` interleaved shares of the samples in threads; returns each share's result."""
    shares = [samples[i::jobs] for i in range(min(jobs, len(samples)))]
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // len(shares)))  # one level of parallelism, not two
    try:
        return Parallel(n_jobs=len(shares), prefer="threads")(delayed(work)(share) for share in shares)
    finally:
        torch.set_num_threads(threads)
