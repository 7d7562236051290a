"""Small reference models for sparse-training experiments on 28x28 grey images (Fashion-MNIST)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ModelError, close_matches


class SmallCNN(nn.Module):
    """Two 3x3 convs (32, 64 channels, each followed by 2x2 max-pool) and two linear layers."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32, hidden: int = 256) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc1 = nn.Linear(2 * width * 7 * 7, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class MLP(nn.Module):
    """LeNet-300-100 style MLP on flattened 28x28 inputs."""

    def __init__(self, num_classes: int = 10, in_features: int = 784, hidden: tuple[int, ...] = (300, 100)) -> None:
        super().__init__()
        dims = (in_features, *hidden)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        for layer in self.layers:
            x = F.relu(layer(x))
        return self.head(x)


MODELS = {"cnn": SmallCNN, "mlp": MLP}


def get_model(name: str, **kw: object) -> nn.Module:
    """Build ``"cnn"`` or ``"mlp"``."""
    try:
        cls = MODELS[name.lower()]
    except KeyError:
        raise ModelError(f"unknown model {name!r}; available: {', '.join(MODELS)}." + close_matches(name, MODELS)) from None
    return cls(**kw)  # type: ignore[arg-type]


__all__ = ["MLP", "MODELS", "SmallCNN", "get_model"]
