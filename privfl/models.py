"""Small bundled models for the CLI and examples; library users bring their own ``nn.Module``."""

from __future__ import annotations

import math

from torch import nn

from privfl.config import ModelConfig, ModelKind
from privfl.errors import ConfigError

__all__ = ["MLP", "LogisticRegression", "SmallCNN", "build_model"]


class LogisticRegression(nn.Module):
    """Multinomial logistic regression: one linear layer on flattened inputs."""

    def __init__(self, num_features: int, num_classes: int) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(num_features, num_classes)

    def forward(self, x):  # standard forward
        return self.linear(self.flatten(x))


class MLP(nn.Module):
    """A two-hidden-layer perceptron with ReLU."""

    def __init__(self, num_features: int, num_classes: int, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(num_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x):
        return self.net(x)


class SmallCNN(nn.Module):
    """A small ConvNet for 8x8 grey images (GroupNorm, not BatchNorm, so DP-SGD applies)."""

    def __init__(self, num_classes: int = 10, channels: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1),
            nn.GroupNorm(4, channels),
            nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 3, padding=1),
            nn.GroupNorm(4, 2 * channels),
            nn.ReLU(),
            nn.AvgPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * channels * 16, num_classes))

    def forward(self, x):
        return self.head(self.features(x))


def build_model(config: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Builds a bundled model for the given input shape.

    Raises:
        ConfigError: the CNN asked for on non-image input.
    """
    num_features = math.prod(input_shape)
    if config.kind is ModelKind.LOGISTIC:
        return LogisticRegression(num_features, num_classes)
    if config.kind is ModelKind.MLP:
        return MLP(num_features, num_classes, config.hidden)
    if len(input_shape) != 3 or input_shape[0] != 1:
        raise ConfigError("model.kind", config.kind.value, f"the CNN needs (1, H, W) images, got {input_shape}")
    return SmallCNN(num_classes)
