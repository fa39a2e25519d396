"""The replica's classifier: a small CNN trained deterministically on the CPU."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from recon.progress import track


class SmallCNN(nn.Module):
    """Three conv blocks and a linear head; big enough for digits/CIFAR-like 32x32, fast on 2 cores."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * w * 16, 128), nn.ReLU(), nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_classifier(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    num_classes: int = 10,
    epochs: int = 12,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
) -> SmallCNN:
    """Adam on the hidden train set; seeded data order and init, deterministic kernels."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = SmallCNN(num_classes, in_channels=images.shape[1])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    x = torch.from_numpy(images)
    y = torch.from_numpy(labels.astype(np.int64))
    loss_fn = nn.CrossEntropyLoss()
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        model.train()
        for _ in track(range(epochs), desc="training replica classifier"):
            order = torch.randperm(len(x), generator=gen)
            for start in range(0, len(x), batch_size):
                idx = order[start : start + batch_size]
                opt.zero_grad()
                loss_fn(model(x[idx]), y[idx]).backward()
                opt.step()
    finally:
        torch.use_deterministic_algorithms(prev)
    return model.eval()


@torch.no_grad()
def predict_logits(model: nn.Module, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
    model.eval()
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]).numpy()


def accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    return float((predict_logits(model, images).argmax(1) == labels).mean())


def load_model(state_dict: dict, num_classes: int = 10, in_channels: int = 3) -> SmallCNN:
    model = SmallCNN(num_classes, in_channels)
    model.load_state_dict(state_dict)
    return model.eval()
