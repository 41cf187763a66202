"""MTCNN's pretrained P-, R- and O-Nets (facenet-pytorch's state dicts, the only real pretrained CNNs that
install offline) and crops of real photographs (scikit-learn's two sample images) to calibrate and test them.

Each net is benchmarked on its own input size: PNet (fully convolutional) on 48x48 crops, RNet on 24x24 and
ONet on 48x48, as the detector feeds them. Crops are random squares of the photographs (side 24 px to half the
short side) resized to the net's size and normalised as facenet-pytorch does, ``(x - 127.5) / 128``;
calibration and test crops come from different seeds. Fidelity against the float net on the test crops:
SQNR per output, the face/no-face decision at MTCNN's stage threshold, the box-regression and landmark error
(both fractions of the box side, the units MTCNN's outputs are in).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SIZES = {"pnet": 48, "rnet": 24, "onet": 48}
THRESHOLDS = {"pnet": 0.6, "rnet": 0.7, "onet": 0.7}   # facenet-pytorch's defaults per stage


def load(name: str) -> torch.nn.Module:
    """The pretrained float net ``name`` (pnet, rnet, onet) in eval mode."""
    from facenet_pytorch.models import mtcnn
    return {"pnet": mtcnn.PNet, "rnet": mtcnn.RNet, "onet": mtcnn.ONet}[name](pretrained=True).eval()


def crops(size: int, count: int, seed: int) -> torch.Tensor:
    """``count`` normalised crops [count, 3, size, size] of the sample photographs, drawn with ``seed``."""
    from sklearn.datasets import load_sample_images
    photos = [torch.tensor(image, dtype=torch.float32).permute(2, 0, 1) for image in load_sample_images().images]
    generator = torch.Generator().manual_seed(seed)
    out = []
    for index in range(count):
        photo = photos[index % len(photos)]
        height, width = photo.shape[1:]
        side = int(torch.randint(24, min(height, width) // 2, (1,), generator=generator))
        top = int(torch.randint(0, height - side + 1, (1,), generator=generator))
        left = int(torch.randint(0, width - side + 1, (1,), generator=generator))
        region = photo[None, :, top:top + side, left:left + side]
        out.append(F.interpolate(region, size=(size, size), mode="bilinear", antialias=True, align_corners=False))
    return (torch.cat(out) - 127.5) / 128.0


def outputs(model, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The net's outputs by name: ``box`` [N, 4, ...], ``landmarks`` [N, 10] (ONet), ``face`` probability [N, ...]."""
    with torch.no_grad():
        values = model(images)
    names = ("box", "landmarks", "probability") if len(values) == 3 else ("box", "probability")
    named = dict(zip(names, values))
    named["face"] = named.pop("probability")[:, 1]
    return named


def sqnr_db(reference: torch.Tensor, value: torch.Tensor) -> float:
    """10 log10(|reference|^2 / |reference - value|^2); inf when identical."""
    noise = (reference - value).pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(reference.pow(2).sum().item() / noise)


def fidelity(name: str, reference: dict[str, torch.Tensor], value: dict[str, torch.Tensor]) -> dict[str, float]:
    """SQNR (dB) per output and their minimum, decision agreement at the stage threshold (fraction of
    positions), mean absolute box and landmark error (fractions of the box side)."""
    result = {f"sqnr_{key}": sqnr_db(reference[key], value[key]) for key in reference}
    result["sqnr_min"] = min(result.values())
    threshold = THRESHOLDS[name]
    result["decision_agreement"] = float(((reference["face"] > threshold) == (value["face"] > threshold)).float().mean())
    result["box_mae"] = float((reference["box"] - value["box"]).abs().mean())
    if "landmarks" in reference:
        result["landmark_mae"] = float((reference["landmarks"] - value["landmarks"]).abs().mean())
    return result
