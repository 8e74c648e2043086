"""The dataset contract: one row per measurement, with its provenance (docs/DESIGN.md, "Conventions").

Everything downstream of a sweep (analysis, plots, notebooks, reports) reads frames with exactly these
columns. `load` accepts one path, a glob, or a list of either, validates every file against `SCHEMA` and
concatenates them, so datasets from several devices sit side by side in one frame.
"""
from __future__ import annotations

import ast
import functools
import glob as _glob
from pathlib import Path

import polars as pl

from q4lab import launch

# Provenance: which device, software and code produced the row.
PROVENANCE = {
    "device": pl.Utf8,          # "NVIDIA H100 80GB HBM3", "cpu: <model>"
    "host": pl.Utf8,            # the machine's host name ("" in datasets written before it was recorded)
    "vendor": pl.Utf8,          # "nvidia" | "amd" | "cpu"
    "arch": pl.Utf8,            # "sm_90", "gfx1100", "x86_64"
    "driver": pl.Utf8,          # driver version ("" on CPU)
    "runtime": pl.Utf8,         # "cuda 13.0", "hip 6.2", "cpu"
    "torch_version": pl.Utf8,
    "q4lab_version": pl.Utf8,
    "git_commit": pl.Utf8,      # "unknown" outside a checkout; "-dirty" suffix when uncommitted changes
    "kernel_hash": pl.Utf8,     # hash of kernels/ sources the library was built from ("" when unused)
    "timestamp": pl.Utf8,       # ISO 8601, UTC, when the row was measured
    "run_id": pl.Utf8,          # one id per sweep invocation; rows of one run share device_gbps/launch_us
    "timer": pl.Utf8,           # "cuda_events" | "wall_clock"
}

# What was measured.
MEASUREMENT = {
    "sweep": pl.Utf8,           # "grid" | "nsweep" | "repeat", or an experiment's "bench" | "configs"
    "impl": pl.Utf8,            # one of ops.IMPLS, or of launch.CONFIG_IMPLS: simt at a fixed launch configuration
    "dtype": pl.Utf8,           # activation dtype: "fp16" | "bf16" | "fp32"
    "quant_type": pl.Utf8,      # "nf4" | "fp4"
    "blocksize": pl.Int64,
    "nested": pl.Boolean,
    "shape": pl.Utf8,           # canonical shape name, or "n{N}_k{K}" for N-sweep and experiment points
    "family": pl.Utf8,          # shape family ("gqa_kv", "mlp_up", ..., "nsweep")
    "N": pl.Int64,
    "K": pl.Int64,
    "M": pl.Int64,
    "time_us": pl.Float64,      # median of round medians, device time
    "time_us_lo": pl.Float64,   # p20 of all samples
    "time_us_hi": pl.Float64,   # p80 of all samples
    "samples": pl.Int64,        # samples over all rounds
    "rounds": pl.Int64,
    "spread": pl.Float64,       # (max - min) / median of the round medians
    "stable": pl.Boolean,       # spread within the run's tolerance after re-measurement
    "host_us": pl.Float64,      # host-inclusive time per call, hot loop, wall clock
    "cold": pl.Boolean,         # L2 flushed before every sample
    "bytes": pl.Int64,          # fewest bytes the impl must move: weight (+state) + A + out (+bias)
    "flops": pl.Int64,          # 2*M*N*K
    "gbps": pl.Float64,         # bytes / time_us / 1e3
    "device_gbps": pl.Float64,  # large-read bandwidth (bench.device_gbps) measured in the same run
    "launch_us": pl.Float64,    # empty-launch latency measured in the same run
}

SCHEMA: dict[str, pl.DataType] = {**PROVENANCE, **MEASUREMENT}
COLUMNS = tuple(SCHEMA)
# Columns added to SCHEMA after datasets were shipped, and the value an older dataset gets for them.
ADDED = {"host": ""}


class DatasetError(ValueError):
    """A dataset that does not follow SCHEMA (missing/ill-typed columns, bad values, unreadable file)."""


def resolve(data) -> list[Path]:
    """Expand a path, a glob, or a list of them into existing files; a pattern matching nothing is an error."""
    items = [data] if isinstance(data, (str, Path)) else list(data)
    if not items:
        raise DatasetError("no dataset given: name at least one (a parquet path, a glob, or a list of them)")
    paths: dict[Path, Path] = {}  # resolved -> as named: a file named twice (or by two globs) is read once
    for item in items:
        matches = sorted(_glob.glob(str(item))) if any(c in str(item) for c in "*?[") else [str(item)]
        if not matches or not all(Path(m).is_file() for m in matches):
            raise DatasetError(f"dataset {item!r}: no such file (give a parquet path, a glob, or a list of them)")
        for m in matches:
            paths.setdefault(Path(m).resolve(), Path(m))
    return list(paths.values())


@functools.cache
def op_names() -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(impl names, dtype names, kernel impl names) as q4lab/ops.py defines them in IMPLS, DTYPES and
    KERNEL_IMPLS, read from its source: importing ops would load torch, which reading a dataset never needs."""
    tree = ast.parse((Path(__file__).parent / "ops.py").read_text(encoding="utf-8"))
    found = {node.targets[0].id: node.value for node in tree.body
             if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)}
    return (ast.literal_eval(found["IMPLS"]), tuple(ast.literal_eval(key) for key in found["DTYPES"].keys),
            ast.literal_eval(found["KERNEL_IMPLS"]))


def _value_rules() -> dict[str, pl.Expr]:
    """What every row must satisfy, by the sentence an error names it with."""
    times = ("time_us", "time_us_lo", "time_us_hi")
    impls, dtypes, kernel_impls = op_names()
    variant = f"^({'|'.join(kernel_impls)})@[0-9a-f]{{16}}$"  # a kernel impl on a variant's library (kernels.variants)
    # time_us is the median of the round medians, lo/hi are p20/p80 of all samples: at least half of all
    # samples lie below the largest round median and half above the smallest, and those lie within
    # `spread` x time_us of time_us (+0.1%: the log keeps samples to 0.1 ns)
    slack = pl.col("spread") + 1e-3
    return {
        "times (time_us, time_us_lo, time_us_hi) finite and positive":
            pl.all_horizontal([pl.col(c).is_finite() & (pl.col(c) > 0) for c in times]),
        "time_us_lo <= time_us_hi": pl.col("time_us_lo") <= pl.col("time_us_hi"),
        "time_us within [time_us_lo, time_us_hi] up to the round spread (a finite spread >= 0)":
            pl.col("spread").is_finite() & (pl.col("spread") >= 0)
            & (pl.col("time_us_lo") <= pl.col("time_us") * (1 + slack))
            & (pl.col("time_us_hi") >= pl.col("time_us") * (1 - slack)),
        "M, N, K >= 1": pl.all_horizontal([pl.col(c) >= 1 for c in ("M", "N", "K")]),
        f"impl one of {', '.join(impls)}, a fixed simt launch configuration ({', '.join(launch.CONFIG_IMPLS)}), "
        f"or one of {', '.join(kernel_impls)} on a kernel variant (impl@<its 16-digit kernel hash>)":
            pl.col("impl").is_in([*impls, *launch.CONFIG_IMPLS]) | pl.col("impl").str.contains(variant),
        f"dtype one of {', '.join(dtypes)}": pl.col("dtype").is_in(dtypes),
    }


def check_values(df: pl.DataFrame, source: str = "frame") -> None:
    """Refuse rows whose numbers no analysis can trust (NaN, negative or missing times, an interval that
    excludes its median, M = 0, an impl or dtype q4lab does not know): the error names the file, the rule,
    how many rows break it and the first few (0-based row numbers)."""
    rules = _value_rules()
    broken = (df.with_row_index("row")
              .select("row", *(expr.fill_null(False).alias(name) for name, expr in rules.items())))
    problems = []
    for name in rules:
        rows = broken.filter(~pl.col(name))["row"]
        if rows.len():
            first = ", ".join(map(str, rows.head(5).to_list())) + (", ..." if rows.len() > 5 else "")
            problems.append(f"{rows.len()} row(s) break {name!r} (rows {first})")
    if problems:
        raise DatasetError(f"{source}: {'; '.join(problems)}. These are not measurements to analyse: re-run "
                           f"the sweep for them, or drop those rows")


def validate(df: pl.DataFrame, source: str = "frame") -> pl.DataFrame:
    """Check columns, types and values (`check_values`) against SCHEMA; return the frame with columns in
    SCHEMA order."""
    df = df.with_columns(pl.lit(v, SCHEMA[c]).alias(c) for c, v in ADDED.items() if c not in df.columns)
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise DatasetError(f"{source}: missing columns {missing}; it was not written by q4lab's sweep "
                           f"(re-run `q4lab sweep`, or convert it to the schema in q4lab/dataset.py)")
    wrong = {c: str(df.schema[c]) for c, t in SCHEMA.items() if df.schema[c] != t}
    if wrong:
        raise DatasetError(f"{source}: columns of the wrong type {wrong}; expected "
                           f"{ {c: str(SCHEMA[c]) for c in wrong} } (a Null column holds no value at all)")
    check_values(df, source)
    return df.select(COLUMNS)


def load(data) -> pl.DataFrame:
    """Read and validate one or several parquet datasets into one frame (devices side by side)."""
    frames = []
    for path in resolve(data):
        try:
            df = pl.read_parquet(path)
        except Exception as err:  # corrupt or not parquet
            raise DatasetError(f"{path}: cannot be read as parquet ({err}); re-run the sweep or restore "
                               f"the file from git") from err
        frames.append(validate(df, str(path)))
    return pl.concat(frames, how="vertical")
