"""Small networks shared by the tests: each exercises one thing a user's model does."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    )


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class TinyNet(nn.Module):
    """ResNet-like net with training-only behaviour and a method besides forward."""

    def __init__(self, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.stem = conv_bn(3, width)
        self.block = Block(width)
        self.down = conv_bn(width, 2 * width, stride=2)
        self.head = nn.Linear(2 * width, num_classes)
        self.aux = nn.Linear(2 * width, num_classes)
        self.drop = nn.Dropout(0.5)

    def forward_features(self, x):
        return self.down(self.block(self.stem(x)))

    def forward(self, x):
        f = self.forward_features(x).mean((2, 3))
        out = self.head(self.drop(f))
        if self.training:
            return out, self.aux(f)
        return out


def tiny_input(batch: int = 2, size: int = 12, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, dtype=dtype)


def train_steps(model: nn.Module, x: torch.Tensor, steps: int = 2, lr: float = 0.05) -> None:
    """A few SGD steps so that masks and BN statistics move away from their initial values."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for _ in range(steps):
        out = model(x)
        loss = sum(o.float().square().mean() for o in (out if isinstance(out, tuple) else (out,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
