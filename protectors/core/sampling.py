"""Seeded, class-stratified sampling of labeled sets (the thief's data, calibration sets, test subsamples)."""

from __future__ import annotations

import torch

from .seeding import torch_generator


def stratified_subset(x: torch.Tensor, y: torch.Tensor, fraction: float,
                      seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A class-stratified random fraction of a labeled set (at least one sample per class), fixed by ``seed``."""
    gen = torch_generator(seed)
    keep = []
    for c in torch.unique(y):
        idx = (y == c).nonzero().flatten()
        n = max(1, round(fraction * len(idx)))
        keep.append(idx[torch.randperm(len(idx), generator=gen)[:n]])
    keep = torch.sort(torch.cat(keep)).values
    return x[keep], y[keep]
