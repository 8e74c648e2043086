"""A model dataset with known, planted effects, in exactly the dataset SCHEMA: what the analyses, plots,
notebooks and their tests run on when no measurement is at hand. Never mistake it for data: every device
name says "(synthetic)" and every provenance field says "synthetic".

Each impl's time comes from a bandwidth model of two made-up devices (an H100-like and a gfx1201-like
card; `DEVICES`), with times in microseconds and bytes counted as `ops.impl_bytes` does:

- `dense`: launch + dense weight bytes / bandwidth + flops / peak;
- `dequant_blas`: a dequantize launch (read 4-bit weight, write the dense one) followed by `dense`;
- `simt`: at M=1 its bandwidth model (launch + 4-bit bytes / (efficiency * bandwidth), efficiency drawn
  per shape in [0.80, 0.90]); at larger M its ratio to `dequant_blas` grows as a power of M that crosses
  1 exactly at the planted crossover M* (so log-log interpolation recovers M* exactly);
- `gemv`: one row at a time, linear in M; `bnb` (NVIDIA only): gemv-like at M=1, dequantize+matmul above.

Planted on top (all keyed by device key and shape name; the defaults are the `PLANTED_*` constants):
`crossovers` (M* per shape; M* > M_max or < M_min plant censored ones), `floors` (simt flat at floor_us
up to m_floor, then rising), `wave_tails` (simt's bandwidth term slowed by the wave-quantization model of
`launch.wave_slowdown`), `unstable` (a shape's simt rows marked unstable), and in the N-sweep `slow_n`
(N that are multiples of a divisor run at a fraction of the bandwidth) and `unstable_n`. Times carry no
noise, so tests can demand that every analysis finds exactly what was planted.
"""
from __future__ import annotations

import math

import numpy as np
import polars as pl

from q4lab.launch import wave_slowdown
from q4lab.dataset import COLUMNS, SCHEMA
from q4lab.shapes import get as get_shape

DEVICES = {
    "H100": {"device": "NVIDIA H100 80GB HBM3 (synthetic)", "vendor": "nvidia", "arch": "sm_90",
             "runtime": "cuda 13.0 (synthetic)", "device_gbps": 3000.0, "launch_us": 4.0, "tflops": 600.0},
    "gfx1201": {"device": "AMD Radeon RX 9070 XT (synthetic)", "vendor": "amd", "arch": "gfx1201",
                "runtime": "hip 6.4 (synthetic)", "device_gbps": 580.0, "launch_us": 5.0, "tflops": 190.0},
}

# canonical shape -> the M* planted as simt's crossover against dequant_blas on the H100
_BASE_CROSSOVER = {
    "llama-3.2-1b.kv_proj": 300, "llama-3-8b.kv_proj": 96, "llama-3-70b.kv_proj": 48,
    "llama-3.2-1b.q_proj": 64, "llama-3.2-3b.q_proj": 40, "llama-3-8b.q_proj": 24, "gemma-2-9b.q_proj": 28,
    "qwen3-235b-a22b.o_proj": 20, "llama-3-70b.q_proj": 12, "probe.narrow_wide": 16,
    "llama-3.2-1b.up_proj": 32, "llama-3-8b.up_proj": 10, "qwen2.5-7b.up_proj": 9, "llama-3-70b.up_proj": 8,
    "llama-3.2-1b.down_proj": 36, "llama-3-8b.down_proj": 14, "qwen2.5-7b.down_proj": 8,
    "llama-3-70b.down_proj": 6,
}
# A made-up shape, no model's layer: with the launcher's model, only a narrow N (a grid that leaves SMs
# idle) under a K wide enough for its bytes to outweigh the launch makes a wave tail an outlier.
_PROBE = ("probe.narrow_wide", 512, 65536, "probe")


def _canonical(name: str) -> tuple[str, int, int, str]:
    s = get_shape(name)
    return s.name, s.N, s.K, s.family


# (name, N, K, family) of those shapes: q4lab.shapes' but the probe
SHAPES = tuple(_PROBE if name == _PROBE[0] else _canonical(name) for name in _BASE_CROSSOVER)
MS = (1, 2, 4, 8, 16, 32, 64, 128)

_DEVICE_SCALE = {"H100": 1.0, "gfx1201": 0.75}
PLANTED_CROSSOVERS = {(d, s): m * scale for d, scale in _DEVICE_SCALE.items() for s, m in _BASE_CROSSOVER.items()}
PLANTED_CROSSOVERS[("gfx1201", "llama-3-70b.down_proj")] = 0.5  # simt never wins: left-censored
PLANTED_FLOORS = {("gfx1201", "llama-3.2-1b.q_proj"): (27.0, 8),  # the reported gfx1201 floor
                  ("H100", "llama-3-8b.kv_proj"): (10.0, 4),
                  ("gfx1201", "llama-3-8b.q_proj"): (60.0, 2)}    # ... but unstable: must not be flagged
PLANTED_WAVE_TAILS = {("H100", "probe.narrow_wide")}
PLANTED_UNSTABLE = {("gfx1201", "llama-3-8b.q_proj")}
NSWEEP = {"K": 4096, "ms": (1,), "n_start": 1024, "n_stop": 16384, "n_step": 128}
PLANTED_SLOW_N = {"H100": (3072, 0.6), "gfx1201": (2048, 0.6)}   # device -> (divisor, bandwidth factor)
PLANTED_UNSTABLE_N = {"H100": (7168,), "gfx1201": (5120,)}       # slow too, but unstable: never flagged

DTYPE_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}
DTYPE_FACTOR = {"fp16": 1.0, "bf16": 1.03, "fp32": 1.6}
UNSTABLE_SPREAD = 0.35


def _quant_bytes(N, K, M, blocksize, elem):
    return N * K // 2 + N * K // blocksize * 4 + (M * K + M * N) * elem


def _dense_bytes(N, K, M, elem):
    return (N * K + M * K + M * N) * elem


def _models(dev: dict, N: int, K: int, ms: np.ndarray, blocksize: int, elem: int, dtype_factor: float,
            efficiency: float, crossover: float, floor, wave: float) -> dict[str, np.ndarray]:
    """time_us per impl over `ms` for one shape on one device and dtype."""
    launch, bw, peak = dev["launch_us"], dev["device_gbps"] * 1e3, dev["tflops"] * 1e6  # per µs
    quant = _quant_bytes(N, K, ms, blocksize, elem)
    dense = dtype_factor * (launch + _dense_bytes(N, K, ms, elem) / (0.92 * bw) + 2.0 * ms * N * K / peak)
    dequant_blas = dtype_factor * (launch + (_quant_bytes(N, K, 0, blocksize, elem) + N * K * elem) / (0.90 * bw)) + dense
    simt = _simt(ms, dequant_blas, dtype_factor * (launch + wave * quant[0] / (efficiency * bw)), crossover, floor)
    gemv1 = dtype_factor * (launch + quant[0] / (0.85 * bw))
    return {"simt": simt, "dequant_blas": dequant_blas, "dense": dense, "gemv": gemv1 * ms,
            "bnb": np.where(ms == 1, 1.1 * gemv1, 1.05 * dequant_blas)}


def _simt(ms: np.ndarray, dequant_blas: np.ndarray, simt1: float, crossover: float, floor) -> np.ndarray:
    """simt's time: its ratio to dequant_blas is a power of M through 1 at M* (from simt1 at M=1, or from
    1.25 x floor_us at the first M past a floor) up to the first measured M >= M*; beyond that it grows
    linearly in M, as a SIMT kernel does once compute-bound."""
    if crossover == 1:
        raise ValueError("a planted crossover of exactly M*=1 has no power law through it; plant 1.5 or 0.5")
    start, t_start = (1, simt1) if crossover > 1 else (None, None)
    if floor is not None:
        floor_us, m_floor = floor
        past = ms[ms > m_floor]
        if not len(past) or crossover <= past[0] or (dequant_blas[ms <= m_floor] <= floor_us).any():
            raise ValueError(f"floor {floor} with crossover M*={crossover}: needs a measured M above m_floor, "
                             f"M* above that M, and dequant_blas slower than the floor up to m_floor")
        start, t_start = past[0], 1.25 * floor_us  # the first M past the floor is clearly off it
    if start is None:  # simt already loses at M=1 and keeps losing
        power = 0.3
    else:
        power = math.log(dequant_blas[ms == start][0] / t_start) / math.log(crossover / start)
        if not 0 < power <= 1.5:
            raise ValueError(f"crossover M*={crossover} needs simt/dequant_blas to grow as M^{power:.2f}; plant "
                             f"an M* further from {start} (or a floor further below dequant_blas)")
    simt = dequant_blas * (ms / crossover) ** power
    if (ms >= crossover).any():
        upper = int(np.flatnonzero(ms >= crossover)[0])
        simt[upper:] = simt[upper] * ms[upper:] / ms[upper]
    if floor is not None:
        simt[ms <= floor[1]] = floor[0]
    return simt


def _rows(base: dict, impl: str, time_us: np.ndarray, nbytes: np.ndarray, N, K, ms, unstable: bool):
    spread = np.full(len(ms), UNSTABLE_SPREAD if unstable else 0.02)
    return {**{c: [v] * len(ms) for c, v in base.items()}, "impl": [impl] * len(ms), "N": [N] * len(ms),
            "K": [K] * len(ms), "M": ms.tolist(), "time_us": time_us.tolist(),
            "time_us_lo": (time_us * (1 - spread / 3)).tolist(), "time_us_hi": (time_us * (1 + spread / 2)).tolist(),
            "spread": spread.tolist(), "stable": [not unstable] * len(ms),
            "host_us": (time_us + 8.0).tolist(), "bytes": nbytes.tolist(),
            "flops": (2 * ms * N * K).tolist(), "gbps": (nbytes / time_us / 1e3).tolist()}


def synthetic_dataset(devices=tuple(DEVICES), shapes=SHAPES, ms=MS, dtypes=("fp16", "bf16"),
                      impls=("simt", "gemv", "dequant_blas", "dense", "bnb"), crossovers=None, floors=None,
                      wave_tails=None, unstable=None, nsweep=NSWEEP, slow_n=None, unstable_n=None,
                      quant_type="nf4", blocksize=64, seed=0) -> pl.DataFrame:
    """The model dataset described in the module docstring, one row per (device, dtype, shape, impl, M)
    plus the N-sweep (impl simt, the first dtype). Planted-effect arguments default to the `PLANTED_*`
    constants; pass `{}` to plant none. `nsweep=None` leaves the N-sweep out."""
    crossovers = PLANTED_CROSSOVERS if crossovers is None else crossovers
    floors = PLANTED_FLOORS if floors is None else floors
    wave_tails = PLANTED_WAVE_TAILS if wave_tails is None else wave_tails
    unstable = PLANTED_UNSTABLE if unstable is None else unstable
    slow_n = PLANTED_SLOW_N if slow_n is None else slow_n
    unstable_n = PLANTED_UNSTABLE_N if unstable_n is None else unstable_n
    unknown = [d for d in devices if d not in DEVICES] + [d for d in dtypes if d not in DTYPE_BYTES]
    if unknown:
        raise ValueError(f"unknown synthetic devices/dtypes {unknown}; choose from {list(DEVICES)} / {list(DTYPE_BYTES)}")
    rng = np.random.default_rng(seed)
    efficiency = {name: rng.uniform(0.80, 0.90) for name, *_ in shapes}
    ms = np.array(sorted(ms))
    columns: dict[str, list] = {c: [] for c in COLUMNS}
    for key in devices:
        dev = DEVICES[key]
        for dtype in dtypes:
            elem = DTYPE_BYTES[dtype]
            for name, N, K, family in shapes:
                if (key, name) not in crossovers:
                    raise ValueError(f"no planted crossover for ({key!r}, {name!r}); add it to `crossovers`")
                wave = 1.0
                if (key, name) in wave_tails:
                    wave = wave_slowdown(N, 1, K, dev["arch"], dtype=dtype)
                    if wave < 1.5:
                        raise ValueError(f"wave tail ({key}, {name}): the wave model predicts only {wave:.2f}x; "
                                         f"plant it on a shape whose grid leaves a mostly empty last wave")
                try:
                    model = _models(dev, N, K, ms, blocksize, elem, DTYPE_FACTOR[dtype], efficiency[name],
                                    crossovers[(key, name)], floors.get((key, name)), wave)
                except ValueError as err:
                    raise ValueError(f"cannot plant on ({key!r}, {name!r}, {dtype}): {err}") from None
                base = _provenance(key, dev, dtype, quant_type, blocksize, "grid", name, family)
                for impl in impls:
                    if impl == "bnb" and dev["vendor"] != "nvidia":
                        continue
                    nbytes = _dense_bytes(N, K, ms, elem) if impl == "dense" else _quant_bytes(N, K, ms, blocksize, elem)
                    _extend(columns, _rows(base, impl, model[impl], nbytes, N, K, ms,
                                           impl == "simt" and (key, name) in unstable))
        if nsweep:
            _nsweep_rows(columns, key, dev, dtypes[0], quant_type, blocksize, nsweep, slow_n.get(key),
                         set(unstable_n.get(key, ())))
    return pl.DataFrame(columns, schema=SCHEMA)


def _extend(columns: dict[str, list], rows: dict[str, list]):
    for c in COLUMNS:
        columns[c].extend(rows[c])


def _provenance(key, dev, dtype, quant_type, blocksize, sweep, shape, family) -> dict:
    return {"device": dev["device"], "vendor": dev["vendor"], "arch": dev["arch"], "driver": "synthetic",
            "runtime": dev["runtime"], "torch_version": "synthetic", "q4lab_version": "synthetic",
            "git_commit": "synthetic", "kernel_hash": "synthetic", "timestamp": "2026-01-01T00:00:00+00:00",
            "host": "synthetic", "run_id": f"synthetic-{key}", "timer": "synthetic", "sweep": sweep, "dtype": dtype,
            "quant_type": quant_type, "blocksize": blocksize, "nested": False, "shape": shape, "family": family,
            "samples": 150, "rounds": 3, "cold": True, "device_gbps": dev["device_gbps"],
            "launch_us": dev["launch_us"]}


def _nsweep_rows(columns, key, dev, dtype, quant_type, blocksize, nsweep, slow, unstable_n):
    """simt over N at fixed K and M: a smooth bandwidth curve, slowed at planted (and unstable) N."""
    K, ms = nsweep["K"], np.array(nsweep["ms"])
    launch, bw = dev["launch_us"], dev["device_gbps"] * 1e3
    for N in range(nsweep["n_start"], nsweep["n_stop"] + 1, nsweep["n_step"]):
        nbytes = _quant_bytes(N, K, ms, blocksize, DTYPE_BYTES[dtype])
        factor = slow[1] if (slow and N % slow[0] == 0) or N in unstable_n else 1.0
        time_us = (launch + nbytes / (0.85 * factor * bw)) * DTYPE_FACTOR[dtype]
        base = _provenance(key, dev, dtype, quant_type, blocksize, "nsweep", f"n{N}_k{K}", "nsweep")
        _extend(columns, _rows(base, "simt", time_us, nbytes, N, K, ms, N in unstable_n))
