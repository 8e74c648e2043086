"""M grids and N sweeps, timed with `bench.time_call`, into a raw JSON-lines log and a parquet dataset.

How a sweep measures:
- The work is cut into chunks that share weights: one shape and quant type (M grid), or a run of
  consecutive N (N sweep). Weights are random normal, quantized once per chunk; activations are random
  normal, one [max M, K] tensor per dtype of which each M takes its first rows.
- Before a point (shape, M, dtype, impl, ...) is timed for the first time, its output is checked against
  a float64 reference on a few rows (the first four and the last); a mismatch, or an impl that raises,
  is logged as an error and the point is not timed.
- A chunk is measured in `rounds` interleaved rounds; round r visits the chunk's points in an order
  rotated by r, so drift hits every impl alike. A point's time is the median of its round medians, its
  spread (max - min) / median of them. A point whose spread exceeds `tol` is measured again (a fresh set
  of rounds, at most `max_remeasure` times); one that never settles is kept with `stable=False`.
- Every round of every point is appended to the log and fsynced as soon as it is taken. A killed sweep
  resumes where it stopped when run again with the same log; nothing taken is lost or taken twice.
  A log belongs to one device and software identity: a run on another refuses to append to it.
- `compact` turns logs into the dataset (q4lab.dataset.SCHEMA); a dataset never mixes identities.

Log records, one JSON object a line, each with "kind" and "run_id":
  run    one invocation: identity (device, versions, kernel hash), git commit, device_gbps, launch_us
  skip   an impl unavailable on the device, and why
  check  a point's output matched the reference (error, tolerance)
  error  a point's output did not match the reference, or its impl raised; the point is not timed
  round  one round of one point: the point, attempt, round, rounds, tolerance, bench.Timing's numbers
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import subprocess
import sys
import tempfile
import uuid
import warnings
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import numpy as np
import polars as pl
import torch
from tqdm.auto import tqdm

import q4lab
from q4lab import bench, dataset, formats, kernels, ops
from q4lab.shapes import FAMILIES, Shape, nsweep_shape, select

GRID_MS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024, 2048)
TIMED_IMPLS = tuple(i for i in ops.IMPLS if i != "reference")
# Largest |out - reference| relative to the largest |reference| that passes, by activation dtype: a few
# roundings of the output and of a dense weight in that dtype; a wrong kernel misses by O(1).
CHECK_TOLERANCE = {"fp32": 1e-3, "fp16": 1e-2, "bf16": 4e-2}
CHECK_FIRST_ROWS = 4          # rows checked: these, plus the last row of every M
NSWEEP_CHUNK_NS = 8           # N values whose points are interleaved in one chunk
# Provenance that must match for rows to share a log or a dataset.
IDENTITY = ("device", "vendor", "arch", "driver", "runtime", "torch_version", "q4lab_version",
            "kernel_hash", "timer")


class SweepError(ValueError):
    """A sweep that cannot run as asked: bad options, or a log/dataset of another device or version."""


class Point(NamedTuple):
    """One future dataset row: what is measured. Its fields are the raw log's key."""
    sweep: str
    shape: str
    family: str
    N: int
    K: int
    M: int
    impl: str
    dtype: str
    quant_type: str
    blocksize: int
    nested: bool
    cold: bool


class Chunk(NamedTuple):
    shapes: tuple[Shape, ...]   # whose weights live on the device together
    quant_type: str


@dataclass(frozen=True)
class Plan:
    sweep: str                  # "grid" | "nsweep" | "repeat"
    chunks: tuple[Chunk, ...]
    ms: tuple[int, ...]
    dtypes: tuple[str, ...]
    impls: tuple[str, ...]
    blocksize: int
    nested: bool
    cold: bool

    def points(self, chunk: Chunk, impls: tuple[str, ...]) -> list[Point]:
        """The chunk's points for `impls` (those of self.impls the device runs), ordered so that all impls
        of one (shape, dtype, M) sit together."""
        return [Point(self.sweep, s.name, s.family, s.N, s.K, M, impl, dtype, chunk.quant_type,
                      self.blocksize, self.nested, self.cold)
                for s in chunk.shapes for dtype in self.dtypes for M in self.ms for impl in impls]


# ---------------------------------------------------------------------------------------------- runs

def run_grid(shapes, ms, dtypes, impls, quant_types=("nf4",), blocksize=64, nested=False, device=None,
             log=None, rounds=3, cold=True, *, tol=0.05, max_remeasure=2, sweep="grid", progress=True,
             part=None) -> pl.DataFrame:
    """Time every (shape, M, dtype, impl, quant type). `shapes`: Shape values, or names/families/"all"
    (see q4lab.shapes.select); `impls`: names, or "all" for every impl but the reference. Returns this
    grid's measured rows in the dataset SCHEMA; `log` (a path) keeps every round and makes the sweep
    resumable. `part=(i, n)`: only the i-th of n balanced parts of the grid."""
    if sweep not in ("grid", "repeat"):
        raise SweepError(f"sweep label {sweep!r}: use 'grid', or 'repeat' for a re-measurement in the same run")
    shape_list = _shape_list(shapes)
    quant_types = _names(quant_types, formats.QUANT_TYPES, "quant type")
    chunks = tuple(Chunk((s,), qt) for s in shape_list for qt in quant_types)
    plan = _plan(sweep, chunks, ms, dtypes, impls, blocksize, nested, cold)
    return _run(plan, device, log, rounds, tol, max_remeasure, progress, part)


def run_nsweep(K, ms, n_start, n_stop, n_step, impls, dtypes=("fp16",), quant_type="nf4", blocksize=64,
               device=None, log=None, rounds=3, *, nested=False, cold=True, tol=0.05, max_remeasure=2,
               progress=True, part=None) -> pl.DataFrame:
    """Time N = n_start, n_start + n_step, ..., up to n_stop (inclusive) at fixed K, for every M, dtype
    and impl. Shapes are named "n{N}_k{K}", family "nsweep". Same log and return value as `run_grid`."""
    if not (0 < n_start <= n_stop and n_step > 0):
        raise SweepError(f"N range {n_start}..{n_stop} step {n_step}: need 0 < n_start <= n_stop and n_step > 0")
    ns = range(n_start, n_stop + 1, n_step)
    points = [nsweep_shape(N, K) for N in ns]
    quant_type = _names([quant_type], formats.QUANT_TYPES, "quant type")[0]
    chunks = tuple(Chunk(tuple(points[i:i + NSWEEP_CHUNK_NS]), quant_type)
                   for i in range(0, len(points), NSWEEP_CHUNK_NS))
    plan = _plan("nsweep", chunks, ms, dtypes, impls, blocksize, nested, cold)
    return _run(plan, device, log, rounds, tol, max_remeasure, progress, part)


def _plan(sweep, chunks, ms, dtypes, impls, blocksize, nested, cold) -> Plan:
    """The validated plan both runners hand to `_run`."""
    return Plan(sweep, chunks, _ms(ms), _names(dtypes, tuple(ops.DTYPES), "dtype"), _impls(impls), blocksize,
                bool(nested), bool(cold))


def _shape_list(spec) -> list[Shape]:
    items = [spec] if isinstance(spec, (str, Shape)) else list(spec)
    if items and all(isinstance(s, Shape) for s in items):
        return items
    if any(isinstance(s, Shape) for s in items):
        raise SweepError("give shapes as Shape values or as names, not a mix of both")
    return select(items)


def _names(given, valid: tuple[str, ...], what: str) -> tuple[str, ...]:
    items = [given] if isinstance(given, str) else list(given)
    items = [t.strip() for item in items for t in str(item).split(",") if t.strip()]
    if not items:
        raise SweepError(f"no {what} given; choose from {', '.join(valid)}")
    unknown = [t for t in items if t not in valid]
    if unknown:
        raise SweepError(f"unknown {what} {', '.join(map(repr, unknown))}; valid: {', '.join(valid)}")
    return tuple(dict.fromkeys(items))


def _impls(impls) -> tuple[str, ...]:
    return TIMED_IMPLS if impls == "all" else _names(impls, ops.IMPLS, "impl")


def _ms(ms) -> tuple[int, ...]:
    ms = [ms] if isinstance(ms, int) else list(ms)
    if not ms or not all(isinstance(m, (int, np.integer)) and m > 0 for m in ms):
        raise SweepError(f"M values must be positive integers, got {ms}")
    return tuple(sorted({int(m) for m in ms}))


def _validate(plan: Plan, rounds: int, tol: float, max_remeasure: int) -> None:
    if plan.blocksize not in formats.BLOCKSIZES:
        raise SweepError(f"blocksize {plan.blocksize}: use one of {formats.BLOCKSIZES}")
    bad = sorted({f"{s.name} (K={s.K})" for c in plan.chunks for s in c.shapes if s.K % plan.blocksize})
    if bad:
        raise SweepError(f"K is not a multiple of blocksize {plan.blocksize} for {', '.join(bad)}: "
                         f"choose a blocksize that divides K, or leave these shapes out")
    if rounds < 1 or max_remeasure < 0 or tol <= 0:
        raise SweepError(f"need rounds >= 1, max_remeasure >= 0, tol > 0; got {rounds}, {max_remeasure}, {tol}")


def split_chunks(costs: list[float], parts: int) -> list[list[int]]:
    """Indices of chunks for each of `parts` workers: largest first onto the least-loaded part, each
    part's indices in their original order. Deterministic, so every worker computes the same split."""
    if parts < 1:
        raise SweepError(f"cannot split into {parts} parts")
    loads = [0.0] * parts
    assigned: list[list[int]] = [[] for _ in range(parts)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        p = loads.index(min(loads))
        loads[p] += costs[i]
        assigned[p].append(i)
    return [sorted(a) for a in assigned]


def _chunk_cost(plan: Plan, chunk: Chunk) -> float:
    return float(sum(s.N * s.K for s in chunk.shapes) * sum(plan.ms))


# ------------------------------------------------------------------------------------------ the log

class RawLog:
    """The append-only JSON-lines log. `append` returns only once the record is on disk."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.records = read_log(self.path) if self.path.exists() else []
        self._file = None

    def append(self, record: dict) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "ab")
            if self._file.tell() and not _ends_with_newline(self.path):
                self._file.write(b"\n")  # a write cut short by a kill: keep the next record on its own line
        self._file.write((json.dumps(record) + "\n").encode())
        self._file.flush()
        os.fsync(self._file.fileno())
        self.records.append(record)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def read_log(path) -> list[dict]:
    """The log's records. Lines that are not JSON (a write cut short by a kill) are skipped with a
    warning; the measurement such a line held is taken again by the next run."""
    records, unreadable = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                unreadable += 1
    if unreadable:
        warnings.warn(f"{path}: skipped {unreadable} unreadable line(s), a write cut short by a kill; "
                      f"running the sweep again re-measures what they held", stacklevel=2)
    return records


def _log_identity(records: list[dict], path) -> dict | None:
    """The one identity of a log's runs (None for a log without runs); several is an error."""
    identities = {json.dumps(r["identity"], sort_keys=True) for r in records if r["kind"] == "run"}
    if len(identities) > 1:
        raise SweepError(f"{path} holds runs of several devices/versions; compact each part separately")
    return json.loads(identities.pop()) if identities else None


def _check_identity(logged: dict | None, identity: dict, path) -> None:
    if logged is None:
        return
    diff = [f"{k}: {logged.get(k)!r} in the log, {identity[k]!r} now" for k in IDENTITY if logged.get(k) != identity[k]]
    if diff:
        raise SweepError(f"{path} was written on another device or version ({'; '.join(diff)}); its rows must "
                         f"not be mixed with this run's: write to a new log (--log other.jsonl)")


@dataclass
class PointLog:
    """What the log knows about one point."""
    checked: bool = False
    error: str | None = None
    attempts: dict[int, dict[int, dict]] = field(default_factory=dict)  # attempt -> round -> record

    def next_rounds(self, rounds: int, tol: float, max_attempts: int) -> tuple[int, int, list[int]] | None:
        """(attempt, its planned rounds, rounds still to take), or None when the point is finished."""
        if self.error is not None:
            return None
        if not self.attempts:
            return 0, rounds, list(range(rounds))
        attempt = max(self.attempts)
        taken = self.attempts[attempt]
        planned = next(iter(taken.values()))["rounds"]
        missing = [r for r in range(planned) if r not in taken]
        if missing:
            return attempt, planned, missing
        if _spread(taken) <= tol or attempt + 1 >= max_attempts:
            return None
        return attempt + 1, rounds, list(range(rounds))

    def finished_attempt(self) -> dict[int, dict] | None:
        """The rounds of the latest attempt that has all its rounds."""
        complete = [a for a, taken in self.attempts.items() if len(taken) == next(iter(taken.values()))["rounds"]]
        return self.attempts[max(complete)] if complete else None


def _spread(taken: dict[int, dict]) -> float:
    medians = [r["time_us"] for r in taken.values()]
    return float((max(medians) - min(medians)) / np.median(medians))


def point_logs(records: list[dict]) -> dict[Point, PointLog]:
    logs: dict[Point, PointLog] = {}
    for rec in records:
        if rec["kind"] not in ("check", "error", "round"):
            continue
        plog = logs.setdefault(Point(*(rec[f] for f in Point._fields)), PointLog())
        if rec["kind"] == "check":
            plog.checked = True
        elif rec["kind"] == "error":
            plog.error = rec["reason"]
        else:
            plog.attempts.setdefault(rec["attempt"], {})[rec["round"]] = rec
    return logs


# ------------------------------------------------------------------------------------------ measuring

def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _git_commit() -> str:
    """The environment's Q4LAB_GIT_COMMIT when set (a copy of the tree on a GPU machine may carry a stale
    .git whose HEAD is not what was sent), else HEAD of the checkout q4lab runs from, "-dirty" when
    tracked files differ, else "unknown"."""
    if os.environ.get("Q4LAB_GIT_COMMIT"):
        return os.environ["Q4LAB_GIT_COMMIT"]
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if status.stdout.strip() else "")


def _kernel_hash() -> str:
    try:
        return kernels.source_hash()
    except kernels.KernelError:
        return ""


def identity(device: torch.device) -> dict:
    facts = bench.device_facts(device)
    return {k: facts[k] for k in IDENTITY if k in facts} | {"q4lab_version": q4lab.__version__,
                                                            "kernel_hash": _kernel_hash()}


@contextlib.contextmanager
def _opened_log(log):
    """The RawLog at `log`, or in a temporary folder that is removed afterwards when `log` is None."""
    with contextlib.ExitStack() as stack:
        path = Path(log) if log is not None else Path(stack.enter_context(tempfile.TemporaryDirectory())) / "log.jsonl"
        raw = RawLog(path)
        stack.callback(raw.close)
        yield raw


def _run(plan: Plan, device, log, rounds, tol, max_remeasure, progress, part) -> pl.DataFrame:
    device = bench.as_device(device)
    _validate(plan, rounds, tol, max_remeasure)
    chunks = plan.chunks
    if part is not None:
        index, parts = part
        chunks = tuple(chunks[i] for i in split_chunks([_chunk_cost(plan, c) for c in chunks], parts)[index])
    max_attempts = 1 + max_remeasure
    with _opened_log(log) as raw:
        ident = identity(device)
        _check_identity(_log_identity(raw.records, raw.path), ident, raw.path)
        run = {"kind": "run", "run_id": uuid.uuid4().hex[:12], "identity": ident, "git_commit": _git_commit(),
               "started": _now(), "device_gbps": None, "launch_us": None}

        reasons = ops.available_impls(device)
        impls = tuple(i for i in plan.impls if reasons[i] is None)
        plogs = point_logs(raw.records)
        todo = [(chunk, {p: nxt for p in plan.points(chunk, impls)
                         if (nxt := plogs.setdefault(p, PointLog()).next_rounds(rounds, tol, max_attempts))})
                for chunk in chunks]
        todo = [(chunk, points) for chunk, points in todo if points]
        if todo:  # the probes cost device time: only when something is measured
            run["device_gbps"], run["launch_us"] = bench.device_gbps(device), bench.launch_us(device)
        raw.append(run)
        for impl in plan.impls:
            if reasons[impl] is not None:
                warnings.warn(f"impl {impl!r} skipped: unavailable on {device} ({reasons[impl]})", stacklevel=3)
                raw.append({"kind": "skip", "run_id": run["run_id"], "impl": impl, "reason": reasons[impl]})

        remaining = sum(len(missing) for _, points in todo for _, _, missing in points.values())
        position = part[0] if part is not None else 0
        with tqdm(total=remaining, unit="round", desc=f"{plan.sweep} on {ident['device']}", position=position,
                  disable=not progress, dynamic_ncols=True) as bar:
            ctx = _Context(plan, device, raw, run["run_id"], plogs, rounds, tol, max_attempts, bar)
            for chunk, points in todo:
                _measure_chunk(ctx, chunk, points)
        wanted = {p for chunk in chunks for p in plan.points(chunk, impls)}
        return _frame(raw.records, wanted)


@dataclass
class _Context:
    plan: Plan
    device: torch.device
    raw: RawLog
    run_id: str
    plogs: dict[Point, PointLog]
    rounds: int
    tol: float
    max_attempts: int
    bar: tqdm


def _seed(*parts) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


def _measure_chunk(ctx: _Context, chunk: Chunk, todo: dict[Point, tuple[int, int, list[int]]]) -> None:
    plan, device = ctx.plan, ctx.device
    weights = {}
    for s in chunk.shapes:
        gen = torch.Generator(device=device).manual_seed(_seed(s.name))
        W = torch.randn(s.N, s.K, generator=gen, device=device)  # fp32: one weight serves every dtype
        weights[s.name] = formats.quantize(W, chunk.quant_type, plan.blocksize, plan.nested)
        del W
    inputs = {}  # (K, dtype) -> A[max M, K], random normal; M rows are its first M rows
    for K, dtype in {(p.K, p.dtype) for p in todo}:
        gen = torch.Generator(device=device).manual_seed(_seed("A", K, dtype))
        inputs[K, dtype] = torch.randn(max(plan.ms), K, generator=gen, device=device).to(ops.DTYPES[dtype])
    calls = {p: functools.partial(ops.gemm_4bit, inputs[p.K, p.dtype][:p.M], weights[p.shape], impl=p.impl)
             for p in todo}

    references = _References(plan, inputs, weights)
    for p in list(todo):
        if not ctx.plogs[p].checked and not ctx.plogs[p].attempts and not _check(ctx, p, calls[p], references):
            ctx.bar.total -= len(todo.pop(p)[2])

    while todo:
        planned_max = max(planned for _, planned, _ in todo.values())
        items = list(todo)
        for r in range(planned_max):
            shift = r * len(items) // planned_max
            for p in items[shift:] + items[:shift]:
                attempt, planned, missing = todo[p]
                if r in missing and ctx.plogs[p].error is None:
                    _measure_round(ctx, p, calls[p], weights[p.shape], attempt, r, planned)
        todo = {p: nxt for p in items if (nxt := ctx.plogs[p].next_rounds(ctx.rounds, ctx.tol, ctx.max_attempts))}
        ctx.bar.total += sum(len(missing) for _, _, missing in todo.values())
        ctx.bar.refresh()
    del calls, inputs, weights, references
    if device.type == "cuda":
        torch.cuda.empty_cache()


class _References:
    """Reference outputs of the checked rows, once per shape for every dtype together: the reference
    impl's arithmetic (float64 accumulation of the dequantized weight) but on the sweep's device, since
    the `reference` impl itself runs on the CPU, where a 100M-element weight takes seconds to check and
    an N sweep holds hundreds of them."""

    def __init__(self, plan: Plan, inputs: dict, weights: dict):
        self.plan, self.inputs, self.weights = plan, inputs, weights
        self.rows = sorted(set(range(min(CHECK_FIRST_ROWS, max(plan.ms)))) | {m - 1 for m in plan.ms})
        self.cache: dict[str, dict[str, torch.Tensor]] = {}

    def rows_for(self, M: int) -> list[int]:
        return [i for i, row in enumerate(self.rows) if row < M]

    def get(self, p: Point) -> torch.Tensor:
        if p.shape not in self.cache:
            dtypes = [d for d in self.plan.dtypes if (p.K, d) in self.inputs]
            A = torch.cat([self.inputs[p.K, d][self.rows].double() for d in dtypes])
            W = formats.dequantize_float64(self.weights[p.shape])
            out = (A @ W.T).cpu()
            self.cache[p.shape] = dict(zip(dtypes, out.split(len(self.rows))))
        return self.cache[p.shape][p.dtype]


def _record(ctx: _Context, kind: str, p: Point, **fields) -> dict:
    rec = {"kind": kind, "run_id": ctx.run_id, **p._asdict(), **fields, "timestamp": _now()}
    ctx.raw.append(rec)
    return rec


def _error(ctx: _Context, p: Point, reason: str) -> None:
    warnings.warn(f"{p.impl} on {p.shape} M={p.M} {p.dtype}: {reason}; not timed", stacklevel=3)
    _record(ctx, "error", p, reason=reason)
    ctx.plogs[p].error = reason


def _check(ctx: _Context, p: Point, call, references: _References) -> bool:
    """Compare the impl's output on the checked rows with the reference; log the result."""
    tolerance = CHECK_TOLERANCE[p.dtype]
    try:
        out = call()
        ref = references.get(p)
    except Exception as err:  # the impl (or the reference) cannot compute this point: an error row
        _error(ctx, p, f"raised {type(err).__name__}: {err}")
        return False
    rows = references.rows_for(p.M)
    got = out[[references.rows[i] for i in rows]].double().cpu()
    want = ref[rows]
    error = float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))
    if not error <= tolerance:  # NaN fails too
        _error(ctx, p, f"output differs from the reference: max error {error:.3g} of the largest value > "
                       f"tolerance {tolerance:g}")
        return False
    _record(ctx, "check", p, error=error, tolerance=tolerance)
    ctx.plogs[p].checked = True
    return True


def _measure_round(ctx: _Context, p: Point, call, w, attempt: int, r: int, planned: int) -> None:
    try:
        t = bench.time_call(call, device=ctx.device, cold=p.cold)
    except Exception as err:  # e.g. out of memory at a large M: an error row, the sweep goes on
        _error(ctx, p, f"raised {type(err).__name__} while timed: {err}")
        return
    rec = _record(ctx, "round", p, attempt=attempt, round=r, rounds=planned, tolerance=ctx.tol,
                  time_us=t.time_us, time_us_lo=t.time_us_lo, time_us_hi=t.time_us_hi, samples=t.samples,
                  host_us=t.host_us, timer=t.timer, timed_cold=t.cold, hold_us=t.hold_us, rejected=t.rejected,
                  samples_us=[round(s, 4) for s in t.samples_us],
                  bytes=ops.impl_bytes(p.impl, w, p.M, ops.DTYPES[p.dtype]))
    ctx.plogs[p].attempts.setdefault(attempt, {})[r] = rec
    ctx.bar.update()


# ------------------------------------------------------------------------------------------ datasets

def _row(p: Point, taken: dict[int, dict], runs: dict[str, dict]) -> dict:
    recs = [taken[r] for r in sorted(taken)]
    last = max(recs, key=lambda rec: rec["timestamp"])
    run = runs[last["run_id"]]
    medians = [rec["time_us"] for rec in recs]
    time_us = float(np.median(medians))
    samples = np.concatenate([rec["samples_us"] for rec in recs])
    lo, hi = np.percentile(samples, [20, 80])
    spread = _spread(taken)
    return {**run["identity"], "git_commit": run["git_commit"], "timestamp": last["timestamp"],
            "run_id": last["run_id"],
            **p._asdict(), "cold": all(rec["timed_cold"] for rec in recs),
            "time_us": time_us, "time_us_lo": float(lo), "time_us_hi": float(hi), "samples": int(samples.size),
            "rounds": len(recs), "spread": spread, "stable": spread <= last["tolerance"],
            "host_us": float(np.median([rec["host_us"] for rec in recs])), "bytes": last["bytes"],
            "flops": 2 * p.M * p.N * p.K, "gbps": last["bytes"] / time_us / 1e3,
            "device_gbps": run["device_gbps"], "launch_us": run["launch_us"]}


def _frame(records: list[dict], wanted: set[Point] | None = None) -> pl.DataFrame:
    """Dataset rows of one log's finished points (those in `wanted`, when given)."""
    runs = {r["run_id"]: r for r in records if r["kind"] == "run"}
    rows = []
    for p, plog in point_logs(records).items():
        taken = plog.finished_attempt()
        if taken is not None and (wanted is None or p in wanted):
            rows.append(_row(p, taken, runs))
    return pl.DataFrame(rows, schema=dataset.SCHEMA)


def compact(log_path, out_path) -> pl.DataFrame:
    """Write the finished points of one or several logs (a path or a list) into the parquet dataset at
    `out_path`, and return the whole dataset. Rows already in `out_path` from the same runs are replaced,
    so compacting again is harmless; rows of other runs are kept. Logs and dataset must share one
    device/software identity."""
    paths = [Path(log_path)] if isinstance(log_path, (str, Path)) else [Path(p) for p in log_path]
    frames, run_ids, identities = [], set(), {}
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"no log at {path}: give the --log path a sweep wrote")
        records = read_log(path)
        logged = _log_identity(records, path)
        if logged is None:
            raise SweepError(f"{path} holds no runs: it is not a q4lab sweep log")
        identities[str(path)] = logged
        run_ids |= {r["run_id"] for r in records if r["kind"] == "run"}
        frames.append(_frame(records))
        _warn_unfinished(records, path)
    if len({json.dumps(i, sort_keys=True) for i in identities.values()}) > 1:
        raise SweepError(f"these logs come from different devices/versions {identities}: compact each into "
                         f"its own dataset")
    new = pl.concat(frames)
    out = Path(out_path)
    if out.exists():
        old = dataset.load(out)
        _check_dataset_identity(old, next(iter(identities.values())), out)
        new = pl.concat([old.filter(~pl.col("run_id").is_in(sorted(run_ids))), new])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    new.write_parquet(tmp)
    os.replace(tmp, out)
    return new


def _check_dataset_identity(old: pl.DataFrame, ident: dict, out: Path) -> None:
    diff = {k: sorted(set(old[k].unique().to_list()) - {ident[k]}) for k in IDENTITY}
    diff = {k: v for k, v in diff.items() if v}
    if diff:
        raise SweepError(f"{out} holds rows of another device or version ({diff}; this log: "
                         f"{ {k: ident[k] for k in diff} }): write to a new file")


def _warn_unfinished(records: list[dict], path) -> None:
    plogs = point_logs(records).values()
    errors = sum(plog.error is not None for plog in plogs)
    unfinished = sum(plog.error is None and plog.finished_attempt() is None for plog in plogs)
    if errors:
        warnings.warn(f"{path}: {errors} point(s) failed their check or raised (kind 'error' in the log); "
                      f"they have no row", stacklevel=3)
    if unfinished:
        warnings.warn(f"{path}: {unfinished} point(s) unfinished (the sweep was interrupted); run it again "
                      f"with the same log to finish them", stacklevel=3)


# ------------------------------------------------------------------------------------------ several GPUs

RUNNERS = {"run_grid": run_grid, "run_nsweep": run_nsweep}
_WORKER = "import json, sys, q4lab.sweep as s; s.RUNNERS[sys.argv[1]](**json.loads(sys.argv[2]))"


def gpu_list(spec: str | None) -> list[int] | None:
    """`--gpus`: None (this process, current device), "all", or comma-separated visible GPU indices."""
    if spec is None:
        return None
    count = torch.cuda.device_count()
    if count == 0:
        raise SweepError("--gpus given but no GPU is visible to torch; leave --gpus out to run on the CPU")
    if spec == "all":
        return list(range(count))
    try:
        gpus = [int(g) for g in spec.split(",") if g.strip()]
    except ValueError:
        raise SweepError(f"--gpus {spec!r}: give 'all' or GPU indices like 0,1") from None
    bad = [g for g in gpus if not 0 <= g < count]
    if bad or not gpus:
        raise SweepError(f"--gpus {spec!r}: GPUs {bad or spec} do not exist; this host has indices 0..{count - 1}")
    return list(dict.fromkeys(gpus))


def part_logs(log: Path, gpus: list[int]) -> list[Path]:
    return [log.with_name(f"{log.stem}.gpu{g}{log.suffix}") for g in gpus]


def run_on_gpus(func: str, kwargs: dict, gpus: list[int], log: Path) -> list[Path]:
    """Run `func` (run_grid or run_nsweep) split over `gpus`, one process per GPU (CUDA_VISIBLE_DEVICES),
    each on its own part of the chunks into its own log; return the logs."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
    logs = part_logs(log, gpus)
    procs = []
    for i, (gpu, part_log) in enumerate(zip(gpus, logs)):
        env = os.environ | {"CUDA_VISIBLE_DEVICES": visible[gpu] if visible != [""] else str(gpu)}
        child = kwargs | {"device": "cuda:0", "log": str(part_log), "part": [i, len(gpus)]}
        procs.append(subprocess.Popen([sys.executable, "-c", _WORKER, func, json.dumps(child)], env=env))
    failed = [gpus[i] for i, proc in enumerate(procs) if proc.wait() != 0]
    if failed:
        raise RuntimeError(f"the sweep failed on GPU(s) {failed} (see above); run the same command again to "
                           f"resume, nothing measured is lost")
    return logs


# ------------------------------------------------------------------------------------------ command line

def _int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated integers, e.g. 1,2,4") from None


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="sweep_command", required=True)
    grid = sub.add_parser("grid", help="shapes x M x dtypes x impls x quant types",
                          description="Time an M grid into a raw log, then compact it into a parquet dataset.")
    grid.add_argument("--shapes", default="all",
                      help=f"comma-separated shape names, families ({', '.join(FAMILIES)}) or 'all' "
                           f"(default)")
    grid.add_argument("--m", type=_int_list, default=",".join(map(str, GRID_MS)), help="M values (default: %(default)s)")
    grid.add_argument("--dtypes", default="fp16,bf16,fp32", help=f"of {', '.join(ops.DTYPES)} (default: %(default)s)")
    grid.add_argument("--impls", default=",".join(TIMED_IMPLS),
                      help=f"of {', '.join(ops.IMPLS)}, or 'all' for {', '.join(TIMED_IMPLS)} (the default)")
    grid.add_argument("--quant-types", default="nf4",
                      help=f"of {', '.join(formats.QUANT_TYPES)} (default: %(default)s)")
    grid.add_argument("--repeat", action="store_true",
                      help="label the rows sweep='repeat': a re-measurement to show run-to-run spread")

    nsweep = sub.add_parser("nsweep", help="N from start to stop by step at fixed K",
                            description="Time an N sweep into a raw log, then compact it into a parquet dataset.")
    nsweep.add_argument("--k", type=int, required=True, help="K (in_features), a multiple of the blocksize")
    nsweep.add_argument("--m", type=_int_list, default="1,8", help="M values (default: %(default)s)")
    nsweep.add_argument("--n-start", type=int, default=512)
    nsweep.add_argument("--n-stop", type=int, default=16384, help="last N, inclusive (default: %(default)s)")
    nsweep.add_argument("--n-step", type=int, default=64)
    nsweep.add_argument("--dtypes", default="fp16", help=f"of {', '.join(ops.DTYPES)} (default: %(default)s)")
    nsweep.add_argument("--impls", default="simt,dense,bnb",
                        help=f"of {', '.join(ops.IMPLS)}, or 'all' (default: %(default)s)")
    nsweep.add_argument("--quant-type", default="nf4", choices=formats.QUANT_TYPES)

    for cmd in (grid, nsweep):
        cmd.add_argument("--blocksize", type=int, default=64)
        cmd.add_argument("--nested", action="store_true", help="double-quantized (nested) absmax")
        cmd.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: %(default)s)")
        cmd.add_argument("--tol", type=float, default=0.05,
                         help="between-round spread above which a point is measured again (default: %(default)s)")
        cmd.add_argument("--max-remeasure", type=int, default=2,
                         help="re-measurements of an unsettled point before it is kept unstable (default: %(default)s)")
        cmd.add_argument("--warm", action="store_true", help="do not flush the L2 before each sample")
        cmd.add_argument("--out", type=Path, required=True, help="parquet dataset to write or add to")
        cmd.add_argument("--log", type=Path,
                         help="raw JSON-lines log (default: --out with .jsonl); the same log resumes a sweep")
        cmd.add_argument("--gpus", help="'all' or GPU indices (0,1): one process per GPU, one dataset")
        cmd.add_argument("--no-progress", action="store_true", help="no progress bar")

    comp = sub.add_parser("compact", help="raw log(s) -> parquet dataset",
                          description="Compact raw sweep logs of one device into a parquet dataset.")
    comp.add_argument("logs", nargs="+", type=Path)
    comp.add_argument("--out", type=Path, required=True)


def sweep_command(args: argparse.Namespace) -> int:
    if args.sweep_command == "compact":
        frame = compact(args.logs, args.out)
        print(f"{args.out}: {frame.height} rows")
        return 0
    common = dict(blocksize=args.blocksize, nested=args.nested, rounds=args.rounds, cold=not args.warm,
                  tol=args.tol, max_remeasure=args.max_remeasure, progress=not args.no_progress)
    if args.sweep_command == "grid":
        func, kwargs = "run_grid", dict(shapes=args.shapes, ms=args.m, dtypes=args.dtypes, impls=args.impls,
                                        quant_types=args.quant_types, sweep="repeat" if args.repeat else "grid",
                                        **common)
    else:
        func, kwargs = "run_nsweep", dict(K=args.k, ms=args.m, n_start=args.n_start, n_stop=args.n_stop,
                                          n_step=args.n_step, impls=args.impls, dtypes=args.dtypes,
                                          quant_type=args.quant_type, **common)
    log = args.log or args.out.with_suffix(".jsonl")
    gpus = gpu_list(args.gpus)
    if gpus is not None and len(gpus) > 1:
        logs = run_on_gpus(func, kwargs, gpus, log)
    else:
        device = f"cuda:{gpus[0]}" if gpus else None
        RUNNERS[func](**kwargs, device=device, log=log)
        logs = [log]
    frame = compact(logs, args.out)
    print(f"{args.out}: {frame.height} rows (raw log: {', '.join(map(str, logs))})")
    return 0
