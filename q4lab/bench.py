"""The one timing primitive every q4lab measurement uses (`time_call`), and the device probes beside it.

On a GPU (CUDA or ROCm torch) a sample is the device time between two events around one call:

    spin (hold) -> zero the flush buffer (cold L2) -> start event -> fn() -> end event

Event timing counts GPU idle time too: if the host needs longer to queue `fn` than the GPU needs for
the flush, the GPU reaches the start event, then waits for `fn`'s kernels, and the wait is counted
(bitsandbytes' Python dispatch of ~50 µs behind a short flush inflated medians 2-5x).
So each sample first enqueues a spin kernel (`torch.cuda._sleep`) that outlasts the host's time to queue
everything after it; by the time the GPU leaves the spin, flush, events and all of `fn` are queued.
Every sample checks this after the fact (host queue time against the hold), and one whose host outran the
hold is thrown away and the hold lengthened. The sample count adapts until the median is known to about
`rel_tol`.

On a CPU-only torch the same primitive times with the wall clock (`timer="wall_clock"`), without a
cache flush (`cold=False`), and the data says so.

`device_gbps` (large-read bandwidth) and `launch_us` (empty-launch latency) are measured with
`time_call` too, so the bandwidth model `launch_us + bytes / device_gbps` comes from the same method.
"""
from __future__ import annotations

import functools
import math
import os
import platform
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

# Hold sizing: spin at least HOLD_SAFETY x the host's time to queue a sample, never under HOLD_FLOOR_US.
HOLD_SAFETY = 2.0
HOLD_FLOOR_US = 20.0
# A sample counts only when the host queued it within HOLD_MARGIN of the hold (launches take a few µs
# to reach the GPU after the API call returns).
HOLD_MARGIN = 0.8
# This many rejected samples in a row means fn waits for the GPU itself: no hold can cover that.
REJECT_LIMIT = 8
WARMUP_CALLS = 3
SAMPLE_BATCH = 10          # samples queued between synchronizations
HOST_LOOP_US = 2000.0      # the host_us hot loop runs about this long (3 to 100 calls)
FALLBACK_L2_BYTES = 128 << 20     # flush 2x this (256 MiB) when torch does not report the L2 size
# torch reports AMD's L2 only, not the Infinity Cache behind it (96 MB on gfx1100, 256 MB on MI300X);
# zeroing 512 MiB evicts both.
AMD_MIN_FLUSH_BYTES = 512 << 20
READ_PROBE_BYTES = {"cuda": 1 << 30, "cpu": 256 << 20}   # both far larger than the last-level cache


@dataclass(frozen=True)
class Timing:
    """What `time_call` measured; times are per call, in microseconds."""
    time_us: float            # median of the samples (device time on a GPU)
    time_us_lo: float         # p20 of the samples
    time_us_hi: float         # p80 of the samples
    samples: int
    host_us: float            # host-inclusive time per call: a hot loop of calls, wall clock
    timer: str                # "cuda_events" | "wall_clock"
    cold: bool                # the L2 was flushed before every sample
    hold_us: float            # how long the stream was held before each sample (0 with the wall clock)
    rejected: int             # samples thrown away because the host outran the hold
    samples_us: tuple[float, ...]


def as_device(device: torch.device | str | None = None) -> torch.device:
    """The torch device to measure on: the current GPU if there is one, else the CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"cannot time on device {device}; use a CUDA/ROCm GPU ('cuda', 'cuda:1') or 'cpu'")
    return device


def hold_us_for(host_queue_us: float) -> float:
    """How long to spin the stream before a sample whose flush, events and call take the host
    `host_queue_us` to queue, so that the GPU is still busy when the last of them is queued."""
    return max(HOLD_FLOOR_US, HOLD_SAFETY * host_queue_us)


def was_held(host_queue_us: float, hold_us: float) -> bool:
    """Whether a sample's host queue time fit inside its hold, i.e. no GPU idle time was timed."""
    return host_queue_us <= HOLD_MARGIN * hold_us


def spin_cycles(hold_us: float, cycles_per_us: float) -> int:
    """The argument of `torch.cuda._sleep` that spins for at least `hold_us`."""
    return math.ceil(hold_us * cycles_per_us)


def median_ci_rel(samples_us) -> float:
    """Half-width of a ~95% confidence interval of the median (order statistics), relative to it."""
    x = np.sort(np.asarray(samples_us, dtype=float))
    n = len(x)
    half = 0.98 * math.sqrt(n)  # 1.96 * sqrt(n) / 2 ranks either side of the middle
    lo = x[max(0, math.floor(n / 2 - half) - 1)]
    hi = x[min(n - 1, math.ceil(n / 2 + half) - 1)]
    return float((hi - lo) / 2 / np.median(x))


def _need_more(samples_us, started: float, rel_tol, min_samples, max_samples, budget_s) -> bool:
    n = len(samples_us)
    if n < min_samples:
        return True
    if n >= max_samples or time.perf_counter() - started > budget_s:
        return False
    return median_ci_rel(samples_us) > rel_tol


def _summary(samples_us, host_us, timer, cold, hold_us, rejected) -> Timing:
    p20, p50, p80 = np.percentile(samples_us, [20, 50, 80])
    return Timing(float(p50), float(p20), float(p80), len(samples_us), host_us, timer, cold, hold_us,
                  rejected, tuple(float(s) for s in samples_us))


def _host_us(fn: Callable, sync: Callable, per_call_us: float) -> float:
    """Host-inclusive time per call: `n` calls back to back, synchronized at both ends, wall clock."""
    n = int(min(100, max(3, HOST_LOOP_US / max(per_call_us, 1.0))))
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - t0) * 1e6 / n


def time_call(fn: Callable[[], object], *, device: torch.device | str | None = None, cold: bool = True,
              rel_tol: float = 0.01, min_samples: int = 10, max_samples: int = 200,
              budget_s: float = 0.25) -> Timing:
    """Time `fn()` on `device`: warm-up excluded, cold L2 unless `cold=False`, the stream held while the
    host queues each sample, samples until the median is known to `rel_tol` (or `max_samples` or
    `budget_s` is reached, but never fewer than `min_samples`). `fn` must not synchronize the device."""
    if not (0 < min_samples <= max_samples):
        raise ValueError(f"need 0 < min_samples <= max_samples, got {min_samples}, {max_samples}")
    device = as_device(device)
    if device.type == "cpu":
        return _time_wall_clock(fn, rel_tol, min_samples, max_samples, budget_s)
    with torch.cuda.device(device):
        return _time_events(fn, device, cold, rel_tol, min_samples, max_samples, budget_s)


def _time_wall_clock(fn, rel_tol, min_samples, max_samples, budget_s) -> Timing:
    fn()  # warm-up
    samples: list[float] = []
    started = time.perf_counter()
    while _need_more(samples, started, rel_tol, min_samples, max_samples, budget_s):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e6)
    host = _host_us(fn, lambda: None, float(np.median(samples)))
    return _summary(samples, host, "wall_clock", False, 0.0, 0)


def _time_events(fn, device, cold, rel_tol, min_samples, max_samples, budget_s) -> Timing:
    flush = _flush_buffer(device) if cold else None
    rate = _cycles_per_us(device)

    def sample(hold_us: float, start, end) -> float:
        """Queue one sample; return the host's time to queue it (µs)."""
        t0 = time.perf_counter()
        if hold_us:
            torch.cuda._sleep(spin_cycles(hold_us, rate))
        if flush is not None:
            flush.zero_()
        start.record()
        fn()
        end.record()
        return (time.perf_counter() - t0) * 1e6

    def events():
        return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    fn()  # first call: lazy initialization (handles, caches, allocations) is no sample
    torch.cuda.synchronize(device)
    queue_us = float(np.median([sample(0.0, *events()) for _ in range(WARMUP_CALLS)]))
    torch.cuda.synchronize(device)

    hold = hold_us_for(queue_us)
    samples: list[float] = []
    rejected = streak = 0
    started = time.perf_counter()
    while _need_more(samples, started, rel_tol, min_samples, max_samples, budget_s):
        batch = []
        for start, end in [events() for _ in range(SAMPLE_BATCH)]:
            host = sample(hold, start, end)
            if was_held(host, hold):
                batch.append((start, end))
                streak = 0
                continue
            rejected += 1
            streak += 1
            if streak >= REJECT_LIMIT:
                raise RuntimeError(
                    f"the host could not queue the timed call within a {hold:.0f} µs hold {streak} times in a "
                    f"row (last: {host:.0f} µs); the call probably synchronizes the device (.item(), .cpu(), "
                    f"torch.cuda.synchronize) - time a call that only queues work")
            hold = hold_us_for(host)
        torch.cuda.synchronize(device)
        samples += [start.elapsed_time(end) * 1e3 for start, end in batch]
    host = _host_us(fn, lambda: torch.cuda.synchronize(device), max(float(np.median(samples)), queue_us))
    return _summary(samples, host, "cuda_events", cold, hold, rejected)


def flush_bytes(device: torch.device) -> int:
    """Bytes zeroed before each cold sample: twice the last-level cache."""
    props = torch.cuda.get_device_properties(device)
    l2_bytes = getattr(props, "L2_cache_size", 0) or FALLBACK_L2_BYTES
    if torch.version.hip:
        return max(2 * l2_bytes, AMD_MIN_FLUSH_BYTES)
    return 2 * l2_bytes


@functools.cache
def _flush_buffer(device: torch.device) -> torch.Tensor:
    return torch.empty(flush_bytes(device) // 4, dtype=torch.int32, device=device)


@functools.cache
def _cycles_per_us(device: torch.device) -> float:
    """The rate `_sleep` counts at (the SM clock). The fastest rate seen, or the reported peak clock if
    higher, so that a hold computed from it is never shorter than intended."""
    cycles = 1_000_000
    rates = []
    for _ in range(4):  # the first one also wakes the clocks up
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        rates.append(cycles / (start.elapsed_time(end) * 1e3))
    peak_khz = getattr(torch.cuda.get_device_properties(device), "clock_rate", 0) or 0
    return max(max(rates), peak_khz / 1e3)


def device_gbps(device: torch.device | str | None = None) -> float:
    """Large-read bandwidth, GB/s (1e9 bytes/s): bytes of a buffer far larger than any cache (1 GiB on a
    GPU, 256 MiB on a CPU) divided by the median time to sum it. A read, not a copy: the 4-bit kernels
    move almost only weight reads, so reading is the ceiling their achieved bandwidth is held against."""
    device = as_device(device)
    n_bytes = READ_PROBE_BYTES[device.type]
    x = torch.ones(n_bytes // 4, dtype=torch.float32, device=device)
    timing = time_call(x.sum, device=device, cold=False, min_samples=5)  # no flush: x evicts every cache
    return n_bytes / (timing.time_us * 1e3)


def launch_us(device: torch.device | str | None = None) -> float:
    """Empty-launch latency, µs: the time of a one-element fill, timed (cold, held) like every measurement.
    On a CPU it is the cost of dispatching a trivial torch op."""
    device = as_device(device)
    x = torch.zeros(1, device=device)
    return time_call(x.zero_, device=device).time_us


def device_facts(device: torch.device | str | None = None) -> dict:
    """What the device and its software are, as the dataset's provenance columns name them, plus the L2
    size and SM/CU count."""
    device = as_device(device)
    facts = {"torch_version": torch.__version__}
    if device.type == "cpu":
        # Q4LAB_CPU_ARCH: the CPU stands in for a device of that arch (tests run a fleet of CPUs this way)
        stand_in = os.environ.get("Q4LAB_CPU_ARCH")
        return facts | {"device": f"cpu: {_cpu_model()}" + (f" as {stand_in}" if stand_in else ""),
                        "vendor": "cpu", "arch": stand_in or platform.machine(), "driver": "", "runtime": "cpu",
                        "timer": "wall_clock", "l2_bytes": 0,
                        "sm_count": os.cpu_count() or 0}
    props = torch.cuda.get_device_properties(device)
    amd = bool(torch.version.hip)
    arch = props.gcnArchName.split(":")[0] if amd else f"sm_{props.major}{props.minor}"
    return facts | {
        "device": props.name,
        "vendor": "amd" if amd else "nvidia",
        "arch": arch,
        "driver": _driver_version("amdgpu" if amd else "nvidia"),
        "runtime": f"hip {torch.version.hip}" if amd else f"cuda {torch.version.cuda}",
        "timer": "cuda_events",
        "l2_bytes": int(getattr(props, "L2_cache_size", 0) or 0),
        "sm_count": int(props.multi_processor_count),
    }


def _driver_version(module: str) -> str:
    """The loaded kernel driver's version, from sysfs ("" when it does not say)."""
    try:
        with open(f"/sys/module/{module}/version") as f:
            return f.read().strip()
    except OSError:
        return f"linux {platform.release()}" if module == "amdgpu" else ""


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
