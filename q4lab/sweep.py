"""M grids and N sweeps, timed with `bench.time_call`, into a raw log (q4lab.runlog) and a parquet dataset.

How a sweep measures:
- The work is cut into chunks that share weights: one shape and quant type (M grid), or a run of
  consecutive N (N sweep). Weights are random normal, quantized once per chunk; activations are random
  normal, one [max M, K] tensor per dtype of which each M takes its first rows.
- Before a point (shape, M, dtype, impl, ...) is timed for the first time, its output is checked against
  a float64 reference on a few rows (the first four and the last); a mismatch, or an impl that raises,
  is logged as an error and the point is not timed.
- A chunk is measured in `rounds` interleaved rounds; round r visits the chunk's points (or, with
  `interleave_ms=False`, one M's points at a time) in an order rotated by r, so drift hits every impl
  alike. A point's time is the median of its round medians, its spread (max - min) / median of them. A
  point whose spread exceeds `tol` is measured again (a fresh set of rounds, at most `max_remeasure`
  times); one that never settles is kept with `stable=False`.
- Every round is in the log as soon as it is taken (q4lab.runlog): a killed sweep resumes where it
  stopped when run again with the same log; `runlog.compact` turns logs into the dataset. One sweep at
  a time appends to a log: a second is refused, naming the first (q4lab.writer_lock).
"""
from __future__ import annotations

import contextlib
import functools
import re
import socket
import tempfile
import threading
import uuid
import warnings
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import polars as pl
import torch
from tqdm.auto import tqdm

import q4lab
from q4lab import bench, formats, kernels, launch, ops, provenance, writer_lock
from q4lab.checks import CHECK_TOLERANCE, CheckedRows, check_error
from q4lab.runlog import (IDENTITY, Point, PointLog, RawLog, SweepError, check_identity, finished_rows,
                          log_identity, point_logs)
from q4lab.shapes import Shape, select, sized_shape

GRID_MS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024, 2048)
# The shipped grid (q4lab sweep grid --preset shipped): every shape, dtype and timed impl at the Ms the
# analyses read. The largest per-shape crossover of simt against dequant_blas lies below 48 rows for
# fp16/bf16 and below 256 for fp32, so M past 256 only costs time (half the device time of the old grid);
# gemv re-reads the weight per activation row and stops at M=64.
SHIPPED_MS = tuple(m for m in GRID_MS if m <= 256)
SHIPPED_IMPL_MAX_M = {"gemv": 64}
TIMED_IMPLS = tuple(i for i in ops.IMPLS if i not in ("reference", "torch_int4"))  # the peer: named on demand
# The `sweep` labels of M grids: the shipped grid, a re-measurement of some of its points, and the
# experiments `q4lab bench` (any N x K) and `q4lab configs` (every simt launch configuration) run
GRID_LABELS = ("grid", "repeat", "bench", "configs")
NSWEEP_CHUNK_NS = 8           # N values whose points are interleaved in one chunk


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
    impl_max_m: dict[str, int] = field(default_factory=dict)  # impl -> largest M it is timed at

    def points(self, chunk: Chunk, impls: tuple[str, ...]) -> list[Point]:
        """The chunk's points for `impls` (those of self.impls the device runs), ordered so that all impls
        of one (shape, dtype, M) sit together; an impl is planned only for the dtypes and blocksize it
        takes (mma: fp16/bf16, blocksize >= 64)."""
        return [Point(self.sweep, s.name, s.family, s.N, s.K, M, impl, dtype, chunk.quant_type,
                      self.blocksize, self.nested, self.cold)
                for s in chunk.shapes for dtype in self.dtypes for M in self.ms for impl in impls
                if M <= self.impl_max_m.get(impl, M)
                and ops.unsupported_reason(impl, dtype, self.blocksize, (s.N, s.K, M)) is None]


# ---------------------------------------------------------------------------------------------- runs

def run_grid(shapes, ms, dtypes, impls, quant_types=("nf4",), blocksize=64, nested=False, device=None,
             log=None, rounds=3, cold=True, *, tol=0.05, max_remeasure=2, sweep="grid", progress=True,
             part=None, interleave_ms=True, stop=None, impl_max_m=None) -> pl.DataFrame:
    """Time every (shape, M, dtype, impl, quant type). `shapes`: Shape values, or names/families/"all"
    (see q4lab.shapes.select); `impls`: names, or "all" for every impl but the reference. Returns this
    grid's measured rows in the dataset SCHEMA; `log` (a path) keeps every round and makes the sweep
    resumable. `part=(i, n)`: only the i-th of n balanced parts of the grid. `impl_max_m`: {impl: largest
    M} for impls not worth timing at every M.

    `progress`: a tqdm bar of rounds (True), none (False), or a callable `progress(step, done, total)`
    told "measuring bandwidth and launch", then "point k of n" as points finish. `stop`: a
    threading.Event checked before every round; once set, the sweep returns the points finished so far
    (the log keeps the other points' rounds for the next run). `interleave_ms=False`: one M at a time
    (its impls and dtypes interleaved) instead of the chunk's Ms together, so that points finish one M
    after another, as a cancellable live probe wants."""
    plan = grid_plan(shapes, ms, dtypes, impls, quant_types, blocksize, nested, cold, sweep, impl_max_m)
    return run_plan(plan, device, log, rounds, tol, max_remeasure, progress, part, interleave_ms, stop)


def run_nsweep(K, ms, n_start, n_stop, n_step, impls, dtypes=("fp16",), quant_type="nf4", blocksize=64,
               device=None, log=None, rounds=3, *, nested=False, cold=True, tol=0.05, max_remeasure=2,
               progress=True, part=None) -> pl.DataFrame:
    """Time N = n_start, n_start + n_step, ..., up to n_stop (inclusive) at fixed K, for every M, dtype
    and impl. Shapes are named "n{N}_k{K}", family "nsweep". Same log and return value as `run_grid`."""
    plan = nsweep_plan(K, ms, n_start, n_stop, n_step, impls, dtypes, quant_type, blocksize, nested, cold)
    return run_plan(plan, device, log, rounds, tol, max_remeasure, progress, part)


def grid_plan(shapes, ms, dtypes, impls, quant_types=("nf4",), blocksize=64, nested=False, cold=True,
              sweep="grid", impl_max_m=None) -> Plan:
    """What `run_grid` measures, checked: its chunks and points."""
    if sweep not in GRID_LABELS:
        raise SweepError(f"sweep label {sweep!r}: use 'grid', or 'repeat' for a re-measurement in the same run "
                         f"(or {', '.join(GRID_LABELS[2:])} for an experiment)")
    shape_list = _shape_list(shapes)
    quant_types = _names(quant_types, formats.QUANT_TYPES, "quant type")
    chunks = tuple(Chunk((s,), qt) for s in shape_list for qt in quant_types)
    return _plan(sweep, chunks, ms, dtypes, impls, blocksize, nested, cold, impl_max_m)


def nsweep_plan(K, ms, n_start, n_stop, n_step, impls, dtypes=("fp16",), quant_type="nf4", blocksize=64,
                nested=False, cold=True) -> Plan:
    """What `run_nsweep` measures, checked: its chunks and points."""
    if not (0 < n_start <= n_stop and n_step > 0):
        raise SweepError(f"N range {n_start}..{n_stop} step {n_step}: need 0 < n_start <= n_stop and n_step > 0")
    ns = range(n_start, n_stop + 1, n_step)
    points = [sized_shape(N, K, "nsweep") for N in ns]
    quant_type = _names([quant_type], formats.QUANT_TYPES, "quant type")[0]
    chunks = tuple(Chunk(tuple(points[i:i + NSWEEP_CHUNK_NS]), quant_type)
                   for i in range(0, len(points), NSWEEP_CHUNK_NS))
    return _plan("nsweep", chunks, ms, dtypes, impls, blocksize, nested, cold)


def _plan(sweep, chunks, ms, dtypes, impls, blocksize, nested, cold, impl_max_m=None) -> Plan:
    """The plan both planners return."""
    return Plan(sweep, chunks, _ms(ms), _names(dtypes, tuple(ops.DTYPES), "dtype"), _impls(impls), blocksize,
                bool(nested), bool(cold), dict(impl_max_m or {}))


def _shape_list(spec) -> list[Shape]:
    items = [spec] if isinstance(spec, (str, Shape)) else list(spec)
    items = [Shape(*s) if isinstance(s, list) else s for s in items]  # a Shape through JSON (run_on_gpus)
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
    if impls == "all":
        return TIMED_IMPLS
    on_variants = tuple(f"{impl}@{h}" for h in kernels.variants() for impl in ops.KERNEL_IMPLS)
    return _names(impls, (*ops.IMPLS, *launch.CONFIG_IMPLS, *on_variants), "impl")


def base_impl(impl: str) -> str:
    """The ops impl behind an impl name ("simt" for "simt/r2m4", "mma" for "mma@<variant hash>")."""
    return re.split("[/@]", impl, maxsplit=1)[0]


def impl_call(impl: str, A: torch.Tensor, w: formats.Q4Weight):
    """A call computing A @ w^T with `impl`: an ops impl, a launch.CONFIG_IMPLS name, or a kernel impl on
    the library of a variant folder ("mma@<its hash>", `kernels.variants`)."""
    base, _, variant = impl.partition("@")
    if variant:
        call, folder = impl_call(base, A, w), kernels.variants()[variant]

        def on_variant():
            with kernels.using(folder):
                return call()
        return on_variant
    if impl in launch.CONFIG_IMPLS:
        R, MT = launch.CONFIG_IMPLS[impl]
        return functools.partial(ops.simt_gemm, A, w, rows_per_warp=R, m_tile=MT)
    return functools.partial(ops.gemm_4bit, A, w, impl=impl)


def _ms(ms) -> tuple[int, ...]:
    ms = [ms] if isinstance(ms, int) else list(ms)
    if not ms or not all(isinstance(m, (int, np.integer)) and m > 0 for m in ms):
        raise SweepError(f"M values must be positive integers, got {ms}")
    return tuple(sorted({int(m) for m in ms}))


def validate(plan: Plan, rounds: int, tol: float, max_remeasure: int) -> None:
    """Refuse a plan or measuring settings no sweep can run (before anything is measured)."""
    if plan.blocksize not in formats.BLOCKSIZES:
        raise SweepError(f"blocksize {plan.blocksize}: use one of {formats.BLOCKSIZES}")
    bad = list(dict.fromkeys(s for c in plan.chunks for s in c.shapes if s.K % plan.blocksize))
    if bad:  # an N sweep brings hundreds of shapes: name a few, and what would fit their K
        named = ", ".join(f"{s.name} (K={s.K})" for s in bad[:3]) + (", ..." if len(bad) > 3 else "")
        fits = "; ".join(f"K={K}: " + (", ".join(str(b) for b in formats.BLOCKSIZES if K % b == 0) or
                                       f"none, K must be a multiple of {formats.BLOCKSIZES[0]}")
                         for K in sorted({s.K for s in bad})[:3])
        raise SweepError(f"K is not a multiple of blocksize {plan.blocksize} for {len(bad)} shape(s): {named}. "
                         f"Blocksizes that divide K: {fits}. Pick one (--blocksize), or leave these shapes out")
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


# ------------------------------------------------------------------------------------------ measuring

def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def identity(device: torch.device) -> dict:
    facts = bench.device_facts(device)
    return {k: facts[k] for k in IDENTITY if k in facts} | {"q4lab_version": q4lab.__version__,
                                                            "kernel_hash": provenance.current_kernel_hash(),
                                                            "host": socket.gethostname()}


@contextlib.contextmanager
def _opened_log(log):
    """The RawLog at `log`, held by this process alone (`writer_lock`: two sweeps appending to one log would
    take every round twice), or in a temporary folder that is removed afterwards when `log` is None."""
    with contextlib.ExitStack() as stack:
        path = Path(log) if log is not None else Path(stack.enter_context(tempfile.TemporaryDirectory())) / "log.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        stack.enter_context(writer_lock.hold(writer_lock.lock_beside(path), f"sweep log {path}",
                                             "give this sweep its own log (--log, or another --out)"))
        raw = RawLog(path)  # read only once the lock is held: no other run appends any more
        stack.callback(raw.close)
        yield raw


class _Stopped(Exception):
    """The sweep's stop event was set: end it, keeping every finished point."""


def run_plan(plan: Plan, device, log, rounds, tol, max_remeasure, progress, part, interleave_ms=True,
             stop=None) -> pl.DataFrame:
    """Measure `plan` (from `grid_plan` or `nsweep_plan`): the work of `run_grid` and `run_nsweep`."""
    device = bench.as_device(device)
    validate(plan, rounds, tol, max_remeasure)
    chunks = plan.chunks
    if part is not None:
        index, parts = part
        chunks = tuple(chunks[i] for i in split_chunks([_chunk_cost(plan, c) for c in chunks], parts)[index])
    max_attempts = 1 + max_remeasure
    reasons = ops.available_impls(device, tuple(dict.fromkeys(base_impl(i) for i in plan.impls)))
    impls = tuple(i for i in plan.impls if reasons[base_impl(i)] is None)
    if not impls:  # fail before the log exists: a sweep that can measure nothing leaves nothing behind
        why = "; ".join(f"{i}: {reasons[base_impl(i)]}" for i in plan.impls)
        raise SweepError(f"nothing to measure on {device}: no impl asked for runs there ({why}); measure on a GPU, "
                         f"or ask for an impl that runs here (--impls dense)")
    with _opened_log(log) as raw:
        ident = identity(device)
        check_identity(log_identity(raw.records, raw.path), ident, raw.path)
        run = {"kind": "run", "run_id": uuid.uuid4().hex[:12], "identity": ident, "git_commit": provenance.current_git_commit(),
               "started": _now(), "device_gbps": None, "launch_us": None}

        plogs = point_logs(raw.records)
        todo = [(chunk, {p: nxt for p in plan.points(chunk, impls)
                         if (nxt := plogs.setdefault(p, PointLog()).next_rounds(rounds, tol, max_attempts))})
                for chunk in chunks]
        todo = [(chunk, points) for chunk, points in todo if points]
        report = progress if callable(progress) else None
        total = sum(len(points) for _, points in todo)
        if todo:  # the probes cost device time: only when something is measured
            if report:
                report("measuring bandwidth and launch", 0, total)
            run["device_gbps"], run["launch_us"] = bench.device_gbps(device), bench.launch_us(device)
        raw.append(run)
        for impl in plan.impls:
            if (reason := reasons[base_impl(impl)]) is not None:
                warnings.warn(f"impl {impl!r} skipped: unavailable on {device} ({reason})", stacklevel=3)
                raw.append({"kind": "skip", "run_id": run["run_id"], "impl": impl, "reason": reason})

        remaining = sum(len(missing) for _, points in todo for _, _, missing in points.values())
        position = part[0] if part is not None else 0
        with tqdm(total=remaining, unit="round", desc=f"{plan.sweep} on {ident['device']}", position=position,
                  disable=progress is not True, dynamic_ncols=True) as bar:
            ctx = _Context(plan, device, raw, run["run_id"], plogs, rounds, tol, max_attempts, bar, report, total,
                           interleave_ms, stop)
            try:
                for chunk, points in todo:
                    _measure_chunk(ctx, chunk, points)
            except _Stopped:
                pass
        wanted = {p for chunk in chunks for p in plan.points(chunk, impls)}
        return finished_rows(raw.records, wanted)


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
    report: Callable[[str, int, int], None] | None
    total: int                  # points to measure in this run
    interleave_ms: bool
    stop: threading.Event | None
    done: int = 0               # of them finished (or failed their check)

    def finished(self, points: int) -> None:
        self.done += points
        if self.report and points:
            self.report(f"point {self.done} of {self.total}", self.done, self.total)


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
    calls = {p: impl_call(p.impl, inputs[p.K, p.dtype][:p.M], weights[p.shape]) for p in todo}

    references = CheckedRows(plan.ms, plan.dtypes, inputs, weights)
    for p in list(todo):
        if not ctx.plogs[p].checked and not ctx.plogs[p].attempts and not _check(ctx, p, calls[p], references):
            ctx.bar.total -= len(todo.pop(p)[2])
            ctx.finished(1)
    groups = {}  # the points interleaved together: the chunk's, or one (shape, M)'s
    for p, nxt in todo.items():
        groups.setdefault(None if ctx.interleave_ms else (p.shape, p.M), {})[p] = nxt
    for group in groups.values():
        _measure_rounds(ctx, group, calls, weights)
    del calls, inputs, weights, references
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _measure_rounds(ctx: _Context, todo: dict[Point, tuple[int, int, list[int]]], calls: dict, weights: dict) -> None:
    """Interleaved rounds of `todo`'s points until each has settled or used its attempts."""
    while todo:
        planned_max = max(planned for _, planned, _ in todo.values())
        items = list(todo)
        for r in range(planned_max):
            shift = r * len(items) // planned_max
            for p in items[shift:] + items[:shift]:
                attempt, planned, missing = todo[p]
                if r in missing and ctx.plogs[p].error is None:
                    if ctx.stop is not None and ctx.stop.is_set():
                        raise _Stopped
                    _measure_round(ctx, p, calls[p], weights[p.shape], attempt, r, planned)
        todo = {p: nxt for p in items if (nxt := ctx.plogs[p].next_rounds(ctx.rounds, ctx.tol, ctx.max_attempts))}
        ctx.bar.total += sum(len(missing) for _, _, missing in todo.values())
        ctx.bar.refresh()
        ctx.finished(len(items) - len(todo))


def _record(ctx: _Context, kind: str, p: Point, **fields) -> dict:
    rec = {"kind": kind, "run_id": ctx.run_id, **p._asdict(), **fields, "timestamp": _now()}
    ctx.raw.append(rec)
    return rec


def _error(ctx: _Context, p: Point, reason: str) -> None:
    warnings.warn(f"{p.impl} on {p.shape} M={p.M} {p.dtype}: {reason}; not timed", stacklevel=3)
    _record(ctx, "error", p, reason=reason)
    ctx.plogs[p].error = reason


def _check(ctx: _Context, p: Point, call, references: CheckedRows) -> bool:
    """Compare the impl's output on the checked rows with the reference; log the result."""
    tolerance = CHECK_TOLERANCE[p.dtype]
    try:
        out = call()
        ref = references.get(p.shape, p.K, p.dtype, base_impl(p.impl))
    except Exception as err:  # the impl (or the reference) cannot compute this point: an error row
        _error(ctx, p, f"raised {type(err).__name__}: {err}")
        return False
    rows = references.rows_for(p.M)
    error = check_error(out[[references.rows[i] for i in rows]], ref[rows])
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
                  bytes=ops.impl_bytes(base_impl(p.impl), w, p.M, ops.DTYPES[p.dtype]))
    ctx.plogs[p].attempts.setdefault(attempt, {})[r] = rec
    ctx.bar.update()


# Runners by name, for the worker processes of a run over several GPUs (q4lab.sweep_cli.run_on_gpus)
RUNNERS = {"run_grid": run_grid, "run_nsweep": run_nsweep}
