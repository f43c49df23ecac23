"""The flat parameter layout shared by every backend: [W0, b0, W1, b1, ...], W_l as nn.Linear's
[out, in]. One place knows the offsets; everything else asks here."""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch


def num_params(sizes: Sequence[int]) -> int:
    """P for layer sizes [n_0, ..., n_L]."""
    return sum(o * i + o for i, o in zip(sizes[:-1], sizes[1:]))


def unflatten(params: torch.Tensor, sizes: Sequence[int]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Views (W_l [..., out, in], b_l [..., out]) of params [..., P], layer by layer."""
    batch = params.shape[:-1]
    layers, off = [], 0
    for i, o in zip(sizes[:-1], sizes[1:]):
        W = params[..., off : off + o * i].reshape(*batch, o, i)
        off += o * i
        b = params[..., off : off + o]
        off += o
        layers.append((W, b))
    return layers


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """[W0, b0, W1, b1, ...] -> one flat [P] tensor (the inverse of unflatten for one task)."""
    return torch.cat([t.reshape(-1) for t in tensors])
