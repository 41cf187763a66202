"""What every benchmark script shares: timing and the JSON results file."""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Callable

import torch


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
