"""Test helpers for transformers: LayerNorm affines worth folding, random orthogonal symmetries."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def shaken(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random LayerNorm affines and no all-zero parameter (torchvision zeroes the head and class token)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.normal_(1, 0.3)
                m.bias.normal_(0, 0.3)
        for p in model.parameters():
            if not p.abs().sum():
                p.normal_(0, 0.2)
    return model.eval()


def centred_orthogonal(n: int, rng: np.random.Generator) -> np.ndarray:
    """A random orthogonal map that keeps the all-ones vector: identity on it, random on its complement."""
    u = np.ones((n, 1)) / np.sqrt(n)
    basis = np.linalg.qr(np.hstack([u, rng.normal(size=(n, n - 1))]))[0][:, 1:]
    return u @ u.T + basis @ np.linalg.qr(rng.normal(size=(n - 1, n - 1)))[0] @ basis.T


def head_orthogonal(size: int, heads: int, order: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Head ``order[h]`` of the old channels moved to head ``h`` by a random orthogonal block."""
    d = size // heads
    t = np.zeros((size, size))
    for h, g in enumerate(order):
        t[h * d : (h + 1) * d, g * d : (g + 1) * d] = np.linalg.qr(rng.normal(size=(d, d)))[0]
    return t
