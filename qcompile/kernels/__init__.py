"""Native kernels, built on first use with torch's C++ extension loader (needs a C++ compiler and ninja).

``cpu_ops()`` returns the ``torch.ops.qcompile_cpu`` namespace (``packed_linear``, ``dequantize``: see
packed_linear_cpu.cpp for the layout and the maths), or None when the kernels cannot be built here; the
first failure is warned once and callers fall back to dequantize-then-matmul in PyTorch.
"""
from __future__ import annotations

import functools
import os
import platform
import shutil
import warnings
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("packed_linear_cpu.cpp")


def _compile_flags() -> list[str]:
    flags = ["-O3"]
    if platform.machine() in ("x86_64", "AMD64"):
        flags.append("-march=native")  # AVX-512 where the machine has it; the build is cached per machine
    elif platform.machine() in ("aarch64", "arm64"):
        flags.append("-mcpu=native")
    return flags


def _ensure_ninja_on_path() -> None:
    """torch's loader runs ``ninja``; the PyPI wheel puts it next to the interpreter, which may not be on PATH."""
    if shutil.which("ninja"):
        return
    try:
        import ninja
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass


@functools.lru_cache(maxsize=None)
def cpu_ops():
    """The compiled CPU kernels (cached per machine by torch under TORCH_EXTENSIONS_DIR), or None."""
    if os.environ.get("QCOMPILE_NO_NATIVE"):
        return None
    from torch.utils import cpp_extension
    _ensure_ninja_on_path()
    try:
        cpp_extension.load(name="qcompile_packed_linear_cpu", sources=[str(_SOURCE)],
                           extra_cflags=_compile_flags(), is_python_module=False, verbose=False)
    except Exception as error:  # noqa: BLE001 - any build failure means: use the PyTorch fallback
        warnings.warn(f"qcompile: the packed CPU kernels could not be built ({type(error).__name__}: "
                      f"{str(error).splitlines()[0] if str(error) else ''}); packed linears fall back to "
                      "dequantize-then-matmul, which is slower than float. Install a C++ compiler and "
                      "`pip install ninja` to get the fused kernels.", stacklevel=2)
        return None
    return torch.ops.qcompile_cpu
