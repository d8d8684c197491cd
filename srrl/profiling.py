"""Wall-clock accounting of the expensive calls (denoiser, VAE, reward, backward) for the benchmarks."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_totals: dict[str, float] = defaultdict(float)
_sync_cuda = False


def enable_cuda_sync(enabled: bool) -> None:
    """Synchronise CUDA around timed blocks so that GPU time lands in the right bucket (benchmarks only)."""
    global _sync_cuda
    _sync_cuda = enabled and torch.cuda.is_available()


@contextmanager
def timed(name: str) -> Iterator[None]:
    """Add the wall time of the block to the bucket ``name``."""
    if _sync_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    try:
        yield
    finally:
        if _sync_cuda:
            torch.cuda.synchronize()
        _totals[name] += time.perf_counter() - start


def snapshot() -> dict[str, float]:
    """A copy of the accumulated seconds per bucket."""
    return dict(_totals)


def reset() -> None:
    _totals.clear()
