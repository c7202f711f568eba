"""Timing helpers shared by the benchmark scripts (imported as a sibling module: run them from any folder)."""

import statistics
import time

import torch


def median_time(fn, repeats: int, device=None, warmup: bool = True) -> float:
    """Median wall-clock seconds of ``repeats`` calls of ``fn`` after one untimed warm-up call.

    On a CUDA ``device`` each call is followed by a synchronisation, so queued kernels are counted.
    """
    cuda = device is not None and torch.device(device).type == "cuda"

    def run():
        fn()
        if cuda:
            torch.cuda.synchronize()

    if warmup:
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def load_average() -> str:
    """The 1-minute load average (timings are only comparable when it is close to the benchmark's threads)."""
    try:
        return open("/proc/loadavg").read().split()[0]
    except OSError:
        return "?"


def rss_mb() -> float:
    """Resident set size of this process now, in MiB (Linux /proc)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_growth_mb(fn) -> float:
    """MiB by which ``fn()`` raised the process's peak RSS above its RSS at the call (Linux).

    Writing "5" to /proc/self/clear_refs resets the kernel's high-water mark (VmHWM), so earlier peaks (model
    loading, other benchmarks) do not count.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return float("nan")
    start = rss_mb()
    fn()
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024 - start
    return float("nan")
