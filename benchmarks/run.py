"""The benchmark suite: every zoo model x every qcompile method x bit width, side by side with the peers
(auto-round, onnxruntime's quantizers, torchao) on the same model, calibration data and machine.

    python -m benchmarks.run [--quick] [--models mnist-resnet,shakespeare,...] [--out docs/results]

Models, schemes and peers: ``benchmarks/suites.py``. One table per model: rows float, each peer, each qcompile
method x scheme; columns task metric, delta vs float, quantization wall time, peak memory added while
quantizing (resident set; see ``common.PeakMemory``), size (ONNX file, or the tensors of a torch model),
onnxruntime latency and packed-PyTorch latency (median, 2 threads on the CI machine). A peer that fails is a
row with its error (a qcompile failure too). Writes ``<out>/benchmarks.json`` (rows of models not re-run are kept), ``<out>/benchmarks.md``
(the tables) and ``<out>/bench_<model>.png`` (metric vs weight bits, metric vs quantization time).

``--quick`` (CI smoke test, a few minutes on 2 cores): four models (MNIST CNN, digits ViT, P-Net, the LM),
two schemes each, methods RTN / GPTQ / SignRound (20 steps), the first peer of each tool; it checks the
pipeline, not the numbers.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import platform
import tempfile
import time
import warnings
from pathlib import Path

import torch

import qcompile

from . import peers
from .common import OrtModel, PeakMemory, export_fp32, feeds_of, onnx_size_and_latency, torch_latency_ms
from .suites import SUBJECTS, Subject

QUICK_MODELS = ("mnist-resnet", "digits-vit", "pnet", "shakespeare")
QUICK_METHODS = ("rtn", "gptq", "signround")
QUICK_OPTIONS = {"signround": {"iters": 20}}
COLUMNS = ("metric", "delta", "quantize_s", "peak_mib", "size_kib", "onnx_ms", "torch_ms")


def judge(subject: Subject, model, row: dict) -> dict:
    """The row with ``metric`` (and ``details`` where the subject gives more than one number)."""
    result = subject.evaluate(model)
    row["metric"], details = result if isinstance(result, tuple) else (result, None)
    if details is not None:
        row["details"] = details
    return row


def timed(run) -> tuple[object, dict]:
    """``run()`` with warnings silenced: its result and {"quantize_s": wall seconds, "peak_mib": peak memory added}."""
    with warnings.catch_warnings(), PeakMemory() as memory:
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        result = run()
        seconds = time.perf_counter() - start
    return result, {"quantize_s": seconds, "peak_mib": None if memory.peak is None else memory.peak / 2 ** 20}


def qcompile_row(subject: Subject, label: str, method: str, quick: bool, workdir: Path, repeats: int) -> dict:
    scheme = subject.schemes[label]
    config = dataclasses.replace(scheme.config, method=method,
                                 method_options=QUICK_OPTIONS.get(method, {}) if quick else {})
    row = {"tool": f"qcompile {qcompile.__version__}", "method": method, "scheme": label, "bits": scheme.bits}
    quantized, cost = timed(lambda: qcompile.compile(subject.model, subject.calib, config, progress=False))
    row.update(cost)
    path = workdir / f"{subject.name}-{label}-{method}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized.export_onnx(path)
    row.update(onnx_size_and_latency(path, subject.example, repeats))
    if subject.torch_latency:
        row["torch_ms"] = torch_latency_ms(quantized.to_torch(), subject.example, repeats)
    return judge(subject, OrtModel(path) if subject.judge_onnx else quantized, row)


def peer_row(subject: Subject, peer, fp32: Path, feeds: list, workdir: Path, repeats: int) -> dict:
    row = {"tool": peer.tool, "method": peer.method, "scheme": peer.scheme, "bits": peer.bits}
    try:
        artefact, cost = timed(lambda: peer.run(fp32, workdir, feeds))
    except Exception as error:  # noqa: BLE001 - a peer that fails is a row with its error, not the end of the run
        row["error"] = _error_text(error)
        return row
    row.update(cost)
    row["artefact"] = "onnx" if isinstance(artefact, Path) else "fake-quant torch" if peer.fake_quant else "torch"
    if isinstance(artefact, Path):
        row.update(onnx_size_and_latency(artefact, subject.example, repeats))
        return judge(subject, OrtModel(artefact), row)
    if not peer.fake_quant:
        row["size_kib"] = peers.tensor_bytes(artefact) / 1024
        row["torch_ms"] = torch_latency_ms(artefact, subject.example, repeats)
    return judge(subject, artefact, row)


def bench(subject: Subject, quick: bool, workdir: Path, only: str | None = None) -> list[dict]:
    repeats = 5 if quick else 20
    fp32 = workdir / f"{subject.name}-fp32.onnx"
    args, kwargs = qcompile.ir.normalize_batch(subject.calib[0])
    export_fp32(subject.model, (args, kwargs), fp32)
    names = OrtModel(fp32).names
    feeds = [feeds_of(batch, names) for batch in subject.calib]
    rows = [judge(subject, subject.model, {"tool": "float", "method": "-", "scheme": "fp32", "bits": 32,
                                           "torch_ms": torch_latency_ms(subject.model, subject.example, repeats),
                                           **onnx_size_and_latency(fp32, subject.example, repeats)})]
    reference = rows[0]["metric"]

    def add(row: dict) -> None:
        row.update({"model": subject.name, "title": subject.title, "metric_name": subject.metric_name,
                    "higher_is_better": subject.higher_is_better})
        if "metric" in row:
            row["delta"] = row["metric"] - reference if math.isfinite(reference) else None
        if row is not rows[0]:
            rows.append(row)
        print_row(row)
    print_header(subject)
    add(rows[0])
    schemes = list(subject.schemes)[:2] if quick else list(subject.schemes)
    seen_tools = set()
    picked = lambda tool, method, scheme: only is None or only in f"{tool} {method} {scheme}"  # noqa: E731
    for peer in subject.peers:
        if peer.scheme not in schemes or (quick and peer.tool in seen_tools) or not picked(*_key(peer)):
            continue
        seen_tools.add(peer.tool)
        add(peer_row(subject, peer, fp32, feeds, workdir, repeats))
    for label in schemes:
        for method in subject.schemes[label].methods:
            if (quick and method not in QUICK_METHODS) or not picked("qcompile", method, label):
                continue
            try:
                add(qcompile_row(subject, label, method, quick, workdir, repeats))
            except Exception as error:  # noqa: BLE001 - our failure is a row of the table too, never skipped
                add({"tool": f"qcompile {qcompile.__version__}", "method": method, "scheme": label,
                     "bits": subject.schemes[label].bits, "error": _error_text(error)})
    print()
    return rows


def _error_text(error: Exception) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())[:200]}"


def _key(row) -> tuple[str, str, str]:
    """What a row measures: (tool, method, scheme), for a row dict or a Peer."""
    get = row.get if isinstance(row, dict) else lambda name: getattr(row, name)
    return get("tool"), get("method"), get("scheme")


def merge(old: list[dict], new: list[dict], rerun: list[str], partial: bool) -> list[dict]:
    """The stored rows with the re-measured ones in place: a model re-run whole replaces all its rows; with
    ``partial`` (``--only``) a new row replaces the stored row of the same model and (tool, method, scheme)
    where there is one and joins its model's rows otherwise. Rows are ordered by model as in SUBJECTS."""
    kept = [row for row in old if partial or row["model"] not in rerun]
    fresh = {(row["model"], *_key(row)): row for row in new}
    rows = [fresh.pop((row["model"], *_key(row)), row) for row in kept]
    order = list(SUBJECTS)
    return sorted(rows + list(fresh.values()), key=lambda row: order.index(row["model"]))


def _cell(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return "inf"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def print_header(subject: Subject) -> None:
    print(f"== {subject.title} ({subject.name}): {subject.metric_name}, "
          f"{'higher' if subject.higher_is_better else 'lower'} is better")
    print(f"{'tool':<24} {'method':<28} {'scheme':<8} " + " ".join(f"{c:>10}" for c in COLUMNS), flush=True)


def print_row(row: dict) -> None:
    head = f"{row['tool']:<24} {row['method']:<28} {row['scheme']:<8} "
    if "error" in row:
        print(head + f"failed: {row['error'][:110]}", flush=True)
        return
    print(head + " ".join(f"{_cell(row.get(c)):>10}" for c in COLUMNS), flush=True)


def markdown(rows: list[dict], meta: dict) -> str:
    """The tables as markdown, one per model, in the order the rows came."""
    lines = [f"# Benchmark tables ({meta['date']})", "",
             f"Generated by `python -m benchmarks.run{' --quick' if meta['quick'] else ''}` on {meta['machine']}; "
             f"{meta['versions']}. Columns: task metric, delta vs float, quantization wall time (s), peak memory "
             "added while quantizing (MiB, resident set), size (KiB: the ONNX file, or the tensors of a torch "
             "model), onnxruntime and PyTorch latency (ms, median). A failed peer shows its error.", ""]
    for model in dict.fromkeys(row["model"] for row in rows):
        group = [row for row in rows if row["model"] == model]
        first = group[0]
        lines += [f"## {first['title']} (`{model}`): {first['metric_name']}, "
                  f"{'higher' if first['higher_is_better'] else 'lower'} is better", "",
                  "| tool | method | scheme | " + " | ".join(COLUMNS) + " |",
                  "|---|---|---|" + "---:|" * len(COLUMNS)]
        for row in group:
            head = f"| {row['tool']} | {row['method']} | {row['scheme']} | "
            if "error" in row:
                lines.append(head + f"failed: `{row['error']}` |" + " |" * (len(COLUMNS) - 1))
            else:
                lines.append(head + " | ".join(_cell(row.get(c)) for c in COLUMNS) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Two panels for one model: metric vs weight bits (a line per qcompile method, a marker per peer cell)
    and metric vs quantization wall time (log scale)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    done = [row for row in rows if row["tool"] != "float" and _finite(row.get("metric")) is not None]
    figure, (by_bits, by_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    float_row = rows[0]
    for axis in (by_bits, by_time):
        if _finite(float_row.get("metric")) is not None:
            axis.axhline(float_row["metric"], color="black", linestyle=":", label="float")
        axis.set_ylabel(float_row["metric_name"])
    ours = [row for row in done if row["tool"].startswith("qcompile")]
    for method in dict.fromkeys(row["method"] for row in ours):
        cell = [row for row in ours if row["method"] == method]
        (line,) = by_bits.plot(*zip(*sorted((r["bits"], r["metric"]) for r in cell)), marker="o",
                               label=f"qcompile {method}")
        by_time.scatter([r["quantize_s"] for r in cell], [r["metric"] for r in cell], marker="o",
                        color=line.get_color())
    markers = iter("sD^v<>pPX*hH")
    for (tool, method) in dict.fromkeys((row["tool"], row["method"]) for row in done if row not in ours):
        cell = [row for row in done if (row["tool"], row["method"]) == (tool, method)]
        marker = next(markers, "x")
        points = by_bits.scatter([r["bits"] for r in cell], [r["metric"] for r in cell], marker=marker, s=60,
                                 label=f"{tool.split()[0]} {method}")
        by_time.scatter([r["quantize_s"] for r in cell], [r["metric"] for r in cell], marker=marker, s=60,
                        color=points.get_facecolor())
    by_bits.set_xlabel("weight bits")
    by_time.set_xlabel("quantization wall time (s, log)")
    by_time.set_xscale("log")
    by_bits.legend(fontsize=7, loc="best")
    figure.suptitle(f"{float_row['title']}: {float_row['metric_name']}")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", help=f"comma-separated, of {list(SUBJECTS)}")
    parser.add_argument("--out", default="docs/results")
    parser.add_argument("--only", help="re-run only the rows whose 'tool method scheme' contains this text "
                        "(e.g. 'MatMulNBits gptq'), keeping the stored rest")
    args = parser.parse_args()
    names = args.models.split(",") if args.models else list(QUICK_MODELS if args.quick else SUBJECTS)
    unknown = sorted(set(names) - set(SUBJECTS))
    if unknown:
        parser.error(f"unknown models {unknown}; known: {list(SUBJECTS)}")
    torch.manual_seed(0)
    logging.getLogger("onnx_ir").setLevel(logging.ERROR)   # under auto-round's root handler it prints INFO
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"benchmarks{'_quick' if args.quick else ''}.json"
    stored = json.loads(json_path.read_text())["rows"] if json_path.exists() else []
    new = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            new += bench(SUBJECTS[name](args.quick), args.quick, Path(tmp), args.only)
    rows = merge(stored, new, names, partial=args.only is not None)
    for name in names:
        plot([row for row in rows if row["model"] == name], out / f"bench_{name}{'_quick' if args.quick else ''}.png")
    versions = ", ".join([f"torch {torch.__version__}", f"qcompile {qcompile.__version__}",
                          *(peers.version(p) for p in ("onnxruntime", "auto-round", "torchao"))])
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {_cpu_name()}, "
            f"{torch.get_num_threads()} threads", "versions": versions, "quick": args.quick}
    json_path.write_text(json.dumps(_finite({"meta": meta, "rows": rows}), indent=1))
    (out / f"benchmarks{'_quick' if args.quick else ''}.md").write_text(markdown(rows, meta))
    print(f"wrote {json_path}, its markdown tables and the plots in {out}/")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _finite(value):
    """``value`` with non-finite floats (a float row's SQNR) as None, so that the JSON is strict."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


if __name__ == "__main__":
    main()
