"""What every benchmark script shares: timing, peak memory, ONNX export and sessions, the JSON results file."""
from __future__ import annotations

import ctypes
import json
import os
import platform
import re
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

import qcompile


def median_ms(run: Callable[[], object], repeats: int = 20) -> float:
    """Median wall time of ``run()`` in milliseconds, after one warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]


def write_results(path: str, rows: list[dict], **meta) -> None:
    """``{"meta": {date, machine, cpus, torch, **meta}, "rows": rows}`` as JSON at ``path``."""
    header = {"date": time.strftime("%Y-%m-%d"), "machine": platform.machine(), "cpus": os.cpu_count(),
              "torch": torch.__version__, **meta}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        json.dump({"meta": header, "rows": rows}, handle, indent=1)
    print(f"wrote {path}")


class PeakMemory:
    """Peak memory added while the ``with`` body runs, in bytes (``.peak``): on CUDA the allocator's peak
    above what was allocated before; on CPU the process's resident-set high-water mark (``VmHWM``, reset
    through ``/proc/self/clear_refs``) above the resident set at entry. None where neither can be read."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device, self.peak = torch.device(device), None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            self.start = _reset_resident_peak()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.start
        elif self.start is not None:
            self.peak = max(_proc_status_kib("VmHWM") * 1024 - self.start, 0)
        return False


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        return int(re.search(rf"^{field}:\s+(\d+) kB", handle.read(), re.M).group(1))


def _reset_resident_peak() -> int | None:
    """Returns the heap's free pages to the system (glibc ``malloc_trim``: otherwise a run reuses pages an
    earlier run freed and its peak reads low), resets VmHWM to the resident set and returns that set in
    bytes; None off Linux."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return _proc_status_kib("VmRSS") * 1024
    except (OSError, AttributeError):
        return None


def file_size(path: Path) -> int:
    """Bytes of an ONNX model and its external data file, if any."""
    data = Path(f"{path}.data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def export_fp32(model, example, path: Path) -> None:
    """The float model as ONNX (torch's dynamo exporter, opset 21, dynamic batch/sequence dims);
    ``example`` is (args, kwargs)."""
    args, kwargs = example
    dynamic = qcompile.passes.capture.dynamic_shapes(model, args, kwargs)
    with warnings.catch_warnings(), qcompile.passes.capture.inference_settings(model):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, str(path), kwargs=kwargs, dynamo=True, opset_version=21,
                          dynamic_shapes=dynamic, verbose=False, report=False)


def feeds_of(batch, names: list[str]) -> dict:
    """onnxruntime feeds for one calibration batch (a tensor, or a dict of named tensors)."""
    if isinstance(batch, dict):
        return {k: v.numpy() for k, v in batch.items() if k in names}
    return {names[0]: batch.numpy()}


class OrtModel:
    """An ONNX file in an onnxruntime CPU session, called like the PyTorch model it came from: positional
    tensors map to the graph inputs in order, keyword tensors by name; returns the output tensor, or a
    tuple of them when the graph has several."""

    def __init__(self, path: Path):
        import onnxruntime
        self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.session.get_inputs()]

    def feeds(self, *args, **kwargs) -> dict:
        return {**dict(zip(self.names, (a.numpy() for a in args))),
                **{k: v.numpy() for k, v in kwargs.items() if k in self.names}}

    def __call__(self, *args, **kwargs):
        values = [torch.from_numpy(v) for v in self.session.run(None, self.feeds(*args, **kwargs))]
        return values[0] if len(values) == 1 else tuple(values)


def torch_latency_ms(model, example: tuple, repeats: int = 20) -> float:
    """Median milliseconds of ``model(*args, **kwargs)`` under no_grad; ``example`` is (args, kwargs)."""
    args, kwargs = example
    with torch.no_grad():
        return median_ms(lambda: model(*args, **kwargs), repeats)


def onnx_size_and_latency(path: Path, example: tuple, repeats: int = 20) -> dict:
    """{"size_kib": the file's KiB, "onnx_ms": median onnxruntime milliseconds on ``example`` (args, kwargs)}."""
    session = OrtModel(path)
    args, kwargs = example
    feeds = session.feeds(*args, **kwargs)
    return {"size_kib": file_size(path) / 1024, "onnx_ms": median_ms(lambda: session.session.run(None, feeds), repeats)}
