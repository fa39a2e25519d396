"""Input conventions a classifier may expect, and how to convert raw [0, 1] NCHW images to each.

The one public record saw chance-level agreement on raw images, so the convention must be probed, not assumed.
`encode` is what a client sends for a server with that convention; `decode` is what such a server does.
"""

from __future__ import annotations

import numpy as np

CONVENTIONS = ("raw", "cifar_norm", "x255", "channels_last")
CIFAR_MEAN = np.array([0.4914, 0.4822, 0.4465], dtype=np.float32).reshape(1, 3, 1, 1)
CIFAR_STD = np.array([0.2470, 0.2435, 0.2616], dtype=np.float32).reshape(1, 3, 1, 1)


def check(convention: str) -> str:
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown input convention {convention!r}; choose one of {', '.join(CONVENTIONS)}")
    return convention


def encode(images: np.ndarray, convention: str) -> np.ndarray:
    """Raw [0, 1] (n, C, H, W) float32 -> what a server expecting `convention` is sent (same shape)."""
    x = np.ascontiguousarray(images, dtype=np.float32)
    c = check(convention)
    if c == "cifar_norm":
        return ((x - CIFAR_MEAN) / CIFAR_STD).astype(np.float32)
    if c == "x255":
        return x * np.float32(255.0)
    if c == "channels_last":  # HWC memory order inside the CHW-shaped array the API demands
        return np.ascontiguousarray(x.transpose(0, 2, 3, 1)).reshape(x.shape)
    return x


def decode(x: np.ndarray, convention: str) -> np.ndarray:
    """The inverse of `encode`: what the server feeds its model."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    c = check(convention)
    if c == "cifar_norm":
        return (x * CIFAR_STD + CIFAR_MEAN).astype(np.float32)
    if c == "x255":
        return x / np.float32(255.0)
    if c == "channels_last":
        n, ch, h, w = x.shape
        return np.ascontiguousarray(x.reshape(n, h, w, ch).transpose(0, 3, 1, 2))
    return x
