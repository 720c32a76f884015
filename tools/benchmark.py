"""Latency, throughput and memory of every inference engine, plus the simulator camera and the daemon path.

Run through `acquire-refocus benchmark` (which loads this file by path). Output: a table on stdout and, with
--json, a JSON list of records, one per (kind, engine, size, batch):

    {"kind": "engine", "engine": "onnxruntime", "precision": "fp32", "device": "cpu", "size": 2048, "batch": 1,
     "p50_ms": ..., "p99_ms": ..., "fps": ..., ...extra, "machine": {...}}

The machine description (CPU model, cores, GPU, library versions) goes into every record under "machine",
so that each record stands alone when records from several machines are merged; the top level stays a list.

Memory: `peak_rss_mb` is the whole process's peak resident memory during the untimed first (warm-up) call (all engines
built so far included); `rss_increase_mb` is how far that call pushed it above the resident memory just before (what
this engine, size and batch need beyond what is already held).

Fairness on a shared machine: all engines are built and warmed up first, then timed round-robin, one call
each per round, the starting engine rotating every round. Load from other processes then hits every engine
alike, and each record's `round_start_s` (seconds since the first round of its size and batch) shows the
interleaving. Peak RSS is Linux VmHWM, reset before each measurement through /proc/self/clear_refs where the
kernel allows it; GPU memory is torch.cuda.max_memory_allocated (PyTorch and TensorRT engines; ONNX Runtime's
CUDA arena is not visible to it).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import platform
import resource
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from acquire_refocus.config import EngineConfig
from acquire_refocus.engines import BACKENDS, Engine, ModelSource, backend_availability, create_engine
from acquire_refocus.engines.torch_engine import network_stride
from acquire_refocus.errors import UserError
from acquire_refocus.logs import kv

log = logging.getLogger("acquire_refocus.benchmark")

TOOLS_DIR = Path(__file__).resolve().parent
CAMERA_RATE_FPS = {2048: 100.0, 1024: 200.0, 512: 400.0}  # common sCMOS full-frame / ROI rates
BATCH_CANDIDATES = (1, 2, 4, 8)
CPU_PIXEL_BUDGET = 4 * 1024 * 1024  # per batch on CPU: keeps 2048 px frames at batch 1 on a small machine
GPU_PIXEL_BUDGET = 8 * 2048 * 2048


# ----------------------------------------------------------------------------------------------- the machine
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version(module)
    except PackageNotFoundError:
        return None


def machine_description() -> dict[str, Any]:
    import torch

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": usable,
        "gpu": gpu,
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": _version("onnxruntime"),
        "torch_tensorrt": _version("torch-tensorrt") or _version("torch_tensorrt"),
        "tensorrt": _version("tensorrt"),
        "numpy": np.__version__,
    }


# ------------------------------------------------------------------------------------------------- memory
def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark for this process (Linux >= 4.0); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _peak_rss_mb() -> float:
    peak = _status_mb("VmHWM")
    if peak is not None:
        return peak
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux, bytes on macOS
    return max_rss / (1024.0 * 1024.0) if sys.platform == "darwin" else max_rss / 1024.0


def _measure_memory(engine: Engine, batch: np.ndarray) -> dict[str, float | None]:
    import torch

    before_mb = _status_mb("VmRSS")
    reset = _reset_peak_rss()
    on_gpu = engine.device.startswith("cuda")
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    engine.run(batch)
    gpu_mb = torch.cuda.max_memory_allocated() / 2**20 if on_gpu else None
    peak_mb = _peak_rss_mb()
    return {
        "peak_rss_mb": round(peak_mb, 1),  # the whole process (all engines built so far) during this call
        "rss_increase_mb": None if before_mb is None or not reset else round(peak_mb - before_mb, 1),
        "peak_rss_is_process_lifetime": not reset,
        "peak_gpu_mb": None if gpu_mb is None else round(gpu_mb, 1),
    }


# ------------------------------------------------------------------------------------------------- timing
def _percentile_ms(samples_s: Sequence[float], q: float) -> float:
    return round(float(np.percentile(np.asarray(samples_s) * 1000.0, q)), 3)


def _batches_for(engine: Engine, size: int, batches: Sequence[int] | None) -> list[int]:
    if batches is not None:
        return [b for b in batches if b <= engine.max_batch]
    budget = GPU_PIXEL_BUDGET if engine.device.startswith("cuda") else CPU_PIXEL_BUDGET
    fitting = [b for b in BATCH_CANDIDATES if b <= engine.max_batch and b * size * size <= budget]
    return fitting or [1]


def _frames(batch: int, size: int) -> np.ndarray:
    """Smooth random structure in 0..1, like a normalised fluorescence frame (content does not change timing)."""
    rng = np.random.default_rng(size + batch)
    coarse = rng.random((batch, 1, size // 16 + 1, size // 16 + 1), dtype=np.float32)
    return np.ascontiguousarray(np.repeat(np.repeat(coarse, 16, axis=2), 16, axis=3)[:, :, :size, :size])


def engine_records(
    loaded: ModelSource,
    config: EngineConfig,
    engine_names: Sequence[str],
    sizes: Sequence[int],
    repeats: int,
    batches: Sequence[int] | None = None,
    model_label: str = "",
) -> list[dict[str, Any]]:
    """Time each engine at each size and batch, interleaved round-robin; one record per (engine, size, batch).

    Engines are built with the config's engine section unchanged (size range, max_batch), so the files they
    cache are the ones the daemon uses; sizes beyond engine.max_size_px are refused by run_benchmark.
    """
    engines: list[Engine] = []
    for name in engine_names:
        engine = create_engine(loaded, config.model_copy(update={"backend": name}))
        if engine.name != name:
            log.warning(
                kv("benchmark_engine_skipped", engine=name, reason=f"could not be built; fell back to {engine.name}")
            )
            continue
        engines.append(engine)
    records: list[dict[str, Any]] = []
    for size in sizes:
        plan = {id(e): _batches_for(e, size, batches) for e in engines}
        for batch in sorted({b for bs in plan.values() for b in bs}):
            active = [e for e in engines if batch in plan[id(e)]]
            log.info(
                kv(
                    "benchmark_measuring",
                    size=size,
                    batch=batch,
                    repeats=repeats,
                    engines=",".join(e.name for e in active),
                )
            )
            frames = _frames(batch, size)
            memory = {}
            for engine in active:  # the untimed first call: warm-up (lazy initialisation) and memory
                memory[id(engine)] = _measure_memory(engine, frames)
            samples: dict[int, list[float]] = {id(e): [] for e in active}
            starts: dict[int, list[float]] = {id(e): [] for e in active}
            t0 = time.perf_counter()
            for round_index in range(repeats):
                shift = round_index % len(active)
                for engine in active[shift:] + active[:shift]:
                    started = time.perf_counter()
                    engine.run(frames)
                    samples[id(engine)].append(time.perf_counter() - started)
                    starts[id(engine)].append(round(started - t0, 4))
            for engine in active:
                times = samples[id(engine)]
                rate = CAMERA_RATE_FPS.get(size)
                fps = batch / float(np.mean(times))
                records.append(
                    {
                        "kind": "engine",
                        "engine": engine.name,
                        "precision": engine.precision,
                        "device": engine.device,
                        "size": size,
                        "batch": batch,
                        "p50_ms": _percentile_ms(times, 50),
                        "p99_ms": _percentile_ms(times, 99),
                        "mean_ms": round(float(np.mean(times)) * 1000.0, 3),
                        "fps": round(fps, 3),
                        "repeats": repeats,
                        "camera_rate_fps": rate,
                        "frame_budget_ms": None if rate is None else round(1000.0 / rate, 3),
                        "meets_camera_rate": None if rate is None else bool(fps >= rate),
                        "threads": config.num_threads,
                        "model": model_label,
                        "round_start_s": starts[id(engine)],
                        **memory[id(engine)],
                    }
                )
    _mark_best_batch_and_speedup(records)
    return records


def _mark_best_batch_and_speedup(records: list[dict[str, Any]]) -> None:
    by_engine_size: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for record in records:
        by_engine_size.setdefault((record["engine"], record["size"]), []).append(record)
    for group in by_engine_size.values():
        best = max(group, key=lambda r: r["fps"])
        for record in group:
            record["best_batch"] = record is best
    torch_p50 = {(r["size"], r["batch"]): r["p50_ms"] for r in records if r["engine"] == "torch"}
    for record in records:
        reference = torch_p50.get((record["size"], record["batch"]))
        record["speedup_vs_torch"] = None if reference is None else round(reference / record["p50_ms"], 2)


# ------------------------------------------------------------------------- other helpers' benchmark parts
def _load_tool(name: str) -> ModuleType | None:
    path = TOOLS_DIR / f"{name}.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location(f"acquire_refocus_tools_{name}", path)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look their module up there
    spec.loader.exec_module(module)
    return module


def part_records(part: str, sizes: list[int], repeats: int) -> tuple[list[dict[str, Any]], str | None]:
    """Records from tools/bench_sim.py or tools/bench_daemon.py, or ([], why they are absent)."""
    tool, function = {
        "simulator": ("bench_sim", "simulator_records"),
        "daemon": ("bench_daemon", "daemon_records"),
    }[part]
    try:
        module = _load_tool(tool)
        if module is None:
            return [], f"tools/{tool}.py not found: {part} path not measured"
        produce: Callable[[list[int], int], list[dict[str, Any]]] | None = getattr(module, function, None)
        if produce is None:
            return [], f"tools/{tool}.py has no {function}(): {part} path not measured"
        records = [dict(r) for r in produce(sizes, repeats)]
    except Exception as exc:  # another part's failure must not discard the engine measurements already made
        log.exception(kv("benchmark_part_failed", part=part, tool=f"tools/{tool}.py"))
        return [], f"tools/{tool}.py failed ({type(exc).__name__}: {exc}): {part} path not measured"
    for record in records:
        record.setdefault("kind", part)
    return records, None


# ------------------------------------------------------------------------------------------------- output
_COLUMNS = (
    "kind",
    "engine",
    "variant",
    "precision",
    "device",
    "size",
    "batch",
    "p50_ms",
    "p99_ms",
    "fps",
    "gb_per_s",
    "meets_camera_rate",
    "speedup_vs_torch",
    "peak_rss_mb",
    "rss_increase_mb",
    "peak_gpu_mb",
)


def _variant(record: dict[str, Any]) -> str | None:
    """What tells two records of one engine and size apart in the table (simulator case, ZeroMQ transport)."""
    if "case" in record:
        return str(record["case"])
    if "transport" in record:
        return str(record["transport"]).split(" ")[0]
    return None


def format_table(records: list[dict[str, Any]], machine: dict[str, Any], notes: list[str]) -> str:
    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, float):
            return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
        return str(value)

    rows = [[cell(_variant(r) if c == "variant" else r.get(c)) for c in _COLUMNS] for r in records]
    widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c) for i, c in enumerate(_COLUMNS)]
    lines = [
        f"machine: {machine['cpu']} ({machine['cpu_cores_usable']} usable of {machine['cpu_cores']} cores), "
        f"GPU: {machine['gpu'] or 'none'}",
        "versions: "
        + ", ".join(
            f"{k} {machine[k]}"
            for k in ("python", "torch", "onnxruntime", "torch_tensorrt", "tensorrt", "numpy")
            if machine.get(k)
        ),
        "camera rates: " + ", ".join(f"{s} px at {r:g} fps" for s, r in CAMERA_RATE_FPS.items()),
        "",
        "  ".join(c.ljust(w) for c, w in zip(_COLUMNS, widths, strict=True)),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in rows]
    lines += [f"note: {n}" for n in notes]
    return "\n".join(lines)


def run_benchmark(
    loaded: ModelSource | None,
    engine_config: EngineConfig,
    *,
    sizes: list[int],
    engines: list[str] | None,
    repeats: int,
    batches: list[int] | None = None,
    parts: Sequence[str] = ("engine", "simulator", "daemon"),
    model_label: str = "",
    json_path: Path | None = None,
) -> list[dict[str, Any]]:
    """Measure, print the table, write the JSON list; returns the records."""
    if repeats < 1:
        raise UserError("--repeats must be at least 1")
    machine = machine_description()
    notes: list[str] = []
    records: list[dict[str, Any]] = []
    if "engine" in parts:
        if loaded is None:
            raise ValueError("measuring engines needs a model")
        stride = network_stride(loaded.network)
        bad = [size for size in sizes if size < 1 or size % stride]
        if bad:
            raise UserError(f"--sizes: {bad} are not multiples of the network stride ({stride} px)")
        too_large = [size for size in sizes if size > engine_config.max_size_px]
        if too_large:
            raise UserError(
                f"--sizes: {too_large} exceed engine.max_size_px ({engine_config.max_size_px}); engines would tile "
                "them. Raise engine.max_size_px in the config to measure such frames whole."
            )
        if batches is not None and max(batches) > engine_config.max_batch:
            raise UserError(
                f"--batches: {max(batches)} exceeds engine.max_batch ({engine_config.max_batch}); "
                "raise it in the config"
            )
        availability = backend_availability()
        if engines is None:
            engines = [name for name in BACKENDS if availability[name] is None]
            notes += [f"{name} not measured: {availability[name]}" for name in BACKENDS if availability[name]]
        else:
            unknown = [name for name in engines if name not in BACKENDS]
            if unknown:
                raise UserError(f"--engines: unknown engine(s) {', '.join(unknown)}; choose from {', '.join(BACKENDS)}")
            for name in [n for n in engines if availability[n] is not None]:
                notes.append(f"{name} not measured: {availability[name]}")
            engines = [name for name in engines if availability[name] is None]
        records += engine_records(loaded, engine_config, engines, sizes, repeats, batches, model_label)
        measured = {r["engine"] for r in records}
        notes += [
            f"{name} not measured: it could not be built (see the log)" for name in engines if name not in measured
        ]
    for part in ("simulator", "daemon"):
        if part in parts:
            extra, why_not = part_records(part, sizes, repeats)
            records += extra
            if why_not:
                notes.append(why_not)
    for record in records:
        record["machine"] = machine
    print(format_table(records, machine, notes))
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(records, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {len(records)} records to {json_path}")
    return records
