"""Check q4lab's timing primitive on a real GPU (run through `device`; about a minute of GPU time).

    python scripts/gpu_bench_check.py            # writes the mini grid under $OUT (or ./gpu_bench_check)

1. A tiny kernel timed with and without a 200 µs sleep in its Python wrapper: with the stream held, the
   device times agree within 10% (a naive event loop, shown beside, charges the sleep to the kernel).
2. The run's probes: large-read bandwidth (device_gbps) and empty-launch latency (launch_us), and the
   large-copy bandwidth (read + written bytes) for comparison.
3. simt and dense at M=1 on 8192x8192 (fp16, NF4 blocksize 64): time_call (cold, held) against a naive
   back-to-back event loop (warm L2, host overlapped).
4. A 2-shape x 3-M mini grid through sweep.run_grid into $OUT, compacted to parquet, and printed.
Exit status 1 when check 1 fails.
"""
from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import polars as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from q4lab import bench, formats, ops, runlog, sweep  # noqa: E402


def naive_us(fn, device, calls: int = 100) -> float:
    """Events around a loop of calls, as most ad-hoc benchmarks do: warm caches, host overlapped."""
    fn()
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / calls


def naive_single_us(fn, flush: torch.Tensor) -> float:
    """Median of flush, start, fn, end per sample, without a hold: the method that leaks host time."""
    times = []
    for _ in range(30):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        flush.zero_()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return sorted(times)[len(times) // 2]


def copy_gbps(device) -> float:
    src = torch.empty(1 << 28, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = bench.time_call(lambda: dst.copy_(src), device=device, cold=False, min_samples=5)
    return 2 * src.nbytes / t.time_us / 1e3


def compare_m1(device, read_gbps: float) -> None:
    w = formats.quantize(torch.randn(8192, 8192, device=device), "nf4", 64)
    A = torch.randn(1, 8192, device=device, dtype=torch.float16)
    reasons = ops.available_impls(device)
    for impl in ("simt", "dense"):
        if reasons[impl]:
            print(f"  {impl}: unavailable ({reasons[impl]})")
            continue
        call = lambda impl=impl: ops.gemm_4bit(A, w, impl=impl)  # noqa: E731
        t = bench.time_call(call, device=device)
        show(f"{impl} (time_call)", t)
        achieved = ops.impl_bytes(impl, w, 1, torch.float16) / t.time_us / 1e3
        print(f"  {impl + ' (naive loop, warm)':<28} {naive_us(call, device):9.2f} µs; time_call achieves "
              f"{achieved:.0f} GB/s = {achieved / read_gbps:.0%} of the read bandwidth")


def show(name: str, t: bench.Timing) -> None:
    print(f"  {name:<28} {t.time_us:9.2f} µs  (p20 {t.time_us_lo:.2f}, p80 {t.time_us_hi:.2f}, n={t.samples}, "
          f"host {t.host_us:.1f} µs/call, hold {t.hold_us:.0f} µs, rejected {t.rejected})")


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_bench_check: no GPU visible to torch; run it on a GPU machine", file=sys.stderr)
        return 2
    device = bench.as_device("cuda")
    facts = bench.device_facts(device)
    print("device:", facts)
    print(f"flush buffer: {bench.flush_bytes(device) / 2**20:.0f} MiB, spin rate "
          f"{bench._cycles_per_us(device):.0f} cycles/µs")

    print("\n1. slow dispatch must not inflate device time")
    x = torch.zeros(1 << 16, device=device)

    def slow():
        time.sleep(200e-6)
        x.add_(1)

    fast_t = bench.time_call(lambda: x.add_(1), device=device)
    slow_t = bench.time_call(slow, device=device)
    show("tiny kernel", fast_t)
    show("tiny kernel + 200 µs host", slow_t)
    naive_slow = naive_single_us(slow, bench._flush_buffer(device))
    print(f"  naive flush/event loop on the slow call: {naive_slow:.2f} µs (what the hold removes)")
    held_ok = math.isclose(slow_t.time_us, fast_t.time_us, rel_tol=0.10)
    print(f"  {'PASS' if held_ok else 'FAIL'}: device times agree within 10% "
          f"({slow_t.time_us / fast_t.time_us - 1:+.1%})")

    print("\n2. probes")
    read_gbps, launch = bench.device_gbps(device), bench.launch_us(device)
    print(f"  device_gbps (1 GiB read):          {read_gbps:8.1f} GB/s")
    print(f"  copy 1 GiB (read + written bytes): {copy_gbps(device):8.1f} GB/s")
    print(f"  launch_us:                         {launch:8.2f} µs")

    print("\n3. M=1 on 8192x8192, fp16, NF4 blocksize 64")
    compare_m1(device, read_gbps)

    print("\n4. mini grid through run_grid")
    out = Path(os.environ.get("OUT", "gpu_bench_check"))
    out.mkdir(parents=True, exist_ok=True)
    log = out / "mini_grid.jsonl"
    started = time.perf_counter()
    sweep.run_grid(["llama-3-8b.kv_proj", "llama-3-8b.q_proj"], [1, 8, 64], ["fp16"],
                   ["simt", "gemv", "dequant_blas", "dense", "bnb"], device=device, log=log, rounds=3)
    frame = runlog.compact(log, out / "mini_grid.parquet")
    print(f"  {frame.height} rows in {time.perf_counter() - started:.1f} s -> {out / 'mini_grid.parquet'}")
    with pl.Config(tbl_rows=100, tbl_cols=20, tbl_width_chars=200):
        print(frame.select("shape", "M", "impl", "time_us", "time_us_lo", "time_us_hi", "spread", "stable",
                           "host_us", "samples", "gbps", "device_gbps", "launch_us").sort("shape", "M", "time_us"))
    return 0 if held_ok else 1


if __name__ == "__main__":
    sys.exit(main())
