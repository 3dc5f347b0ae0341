"""Timing helpers shared by the benchmarks."""

from __future__ import annotations

import json
import os
import platform
import resource
import time
from collections.abc import Callable
from pathlib import Path

from iam_runtime.files import atomic_write_text
from iam_runtime.pipeline import percentiles


def time_call(fn: Callable[[], object], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times: seconds as median/p90/min."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    stats = percentiles(samples)
    return {"median_s": stats["median"], "p90_s": stats["p90"], "min_s": min(samples), "repeats": repeats}


# The instruction sets that decide onnxruntime's fp32 and int8 kernels on x86.
CPU_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16")


def cpu_info() -> dict[str, object]:
    """The processor's name and its relevant instruction sets (/proc/cpuinfo): machines of one
    kind differ (an AMD EPYC, an Intel Xeon with AMX), and ratios compare only on one processor."""
    cpuinfo = Path("/proc/cpuinfo")
    model, flags = platform.processor() or None, set()
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    return {"model": model, "features": [f for f in CPU_FEATURES if f in flags]}


def machine_info() -> dict[str, object]:
    info: dict[str, object] = {"python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.machine(),
                               "cpu": cpu_info()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    return info


def own_peak_rss_mb() -> float:
    """This process's peak RSS in MB (VmHWM). getrusage's ru_maxrss would not do for a child:
    Linux carries the parent's peak over fork and exec, so it would report the parent's."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_json(path: Path, payload: dict) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2))
