"""Shared benchmark plumbing: timing (CUDA events on GPU, wall clock on CPU) and the long-format
results CSV, bench/results/<device>.csv (docs/design.md#benchmarks)."""

from __future__ import annotations

import argparse
import csv
import datetime
import platform
import re
import resource
import statistics
import threading
import time
from pathlib import Path

import torch

from fastrob._checks import dtype_name

RESULTS_DIR = Path(__file__).resolve().parent / "results"
COLUMNS = ["op", "provider", "shape", "dtype", "metric", "median", "p20", "p80", "device", "torch", "triton", "date"]


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {model} ({torch.get_num_threads()} threads)"


def time_ms(fn, device: torch.device | str, *, warmup: int = 3, reps: int = 20) -> dict:
    """median, p20 and p80 of ``fn()``'s run time in milliseconds."""
    device = torch.device(device)
    if device.type == "cuda":
        import triton.testing

        med, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
        return {"median": med, "p20": p20, "p80": p80}
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    q = statistics.quantiles(times, n=10) if len(times) > 1 else times * 9
    return {"median": statistics.median(times), "p20": q[1], "p80": q[7]}


def copy_bandwidth_gbps(device) -> float:
    """Device copy bandwidth, counting bytes read and written, on a 1 GiB (GPU) / 256 MiB (CPU) buffer."""
    n = (2**30 if torch.device(device).type == "cuda" else 2**28) // 4
    src = torch.empty(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    stats = time_ms(lambda: dst.copy_(src), device)
    return 2 * src.numel() * 4 / (stats["median"] * 1e-3) / 1e9


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_rise_mib(step) -> float:
    """The rise of resident memory over one call of ``step``, sampled every 0.2 ms by a thread
    (tracemalloc does not see torch's allocations; see bench.regularizers.set_mmap_threshold, without
    which freed heap memory is reused and the rise can read low)."""
    before, peak, done = rss_mib(), [0.0], threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], rss_mib())
            time.sleep(2e-4)

    thread = threading.Thread(target=poll)
    thread.start()
    try:
        step()
    finally:
        done.set()
        thread.join()
    return max(0.0, max(peak[0], rss_mib()) - before)


def peak_memory(fn, device) -> tuple[str, float]:
    """(metric, MiB): the peak memory of one call of ``fn`` above what was allocated before it:
    torch.cuda.max_memory_allocated on a GPU (peak_cuda_mib), the rise of resident memory on
    CPU (peak_rss_rise_mib)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return "peak_cuda_mib", (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return "peak_rss_rise_mib", peak_rss_rise_mib(fn)


def row(op: str, provider: str, shape, dtype, metric: str, stats: dict, device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    return {
        "op": op,
        "provider": provider,
        "shape": "x".join(map(str, shape)) if not isinstance(shape, str) else shape,
        "dtype": dtype_name(dtype),
        "metric": metric,
        "median": f"{stats['median']:.6g}",
        "p20": f"{stats['p20']:.6g}",
        "p80": f"{stats['p80']:.6g}",
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "date": datetime.date.today().isoformat(),
    }


def append_rows(rows: list[dict], device) -> Path:
    """Appends rows to bench/results/<device>.csv (header written when the file is new)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device_name(device)).strip("-").lower()
    path = RESULTS_DIR / f"{slug}.csv"
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return path


def save_results(rows: list[dict], device, *, quick: bool) -> None:
    """Appends a full run's rows to the device's CSV; a ``--quick`` run is a smoke test of the
    benchmark itself, and its small-shape numbers stay out of the results (and the table of docs/benchmarks.md)."""
    if quick:
        print("--quick: results not written")
        return
    print(f"results appended to {append_rows(rows, device)}")


def parse_device_args(doc: str, argv=None) -> tuple[argparse.Namespace, torch.device]:
    """(args, device) of a per-op benchmark's command line: --quick (small shapes only) and
    --device (default: the GPU when there is one)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes only")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    return args, torch.device(args.device)
