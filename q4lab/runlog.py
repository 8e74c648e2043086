"""The raw JSON-lines log a sweep appends to, what it knows about each point, and its compaction into a
parquet dataset (q4lab.dataset.SCHEMA).

- Every round of every point is appended and fsynced as soon as it is taken: a killed sweep resumes where
  it stopped when run again with the same log; nothing taken is lost or taken twice.
- A log belongs to one device and software identity (`IDENTITY`): a run on another refuses to append to
  it, and a dataset never mixes identities.
- A damaged line (cut short, not UTF-8, not a record of `RECORD_FIELDS`) is skipped with a warning that
  names it; what it held is measured again.

Log records, one JSON object a line, each with "kind" and "run_id":
  run    one invocation: identity (device, versions, kernel hash), git commit, device_gbps, launch_us
  skip   an impl unavailable on the device, and why
  check  a point's output matched the reference (error, tolerance)
  error  a point's output did not match the reference, or its impl raised; the point is not timed
  round  one round of one point: the point, attempt, round, rounds, tolerance, bench.Timing's numbers
"""
from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import polars as pl

from q4lab import dataset, writer_lock

# How long a compaction waits for another one into the same dataset to finish (it takes seconds)
COMPACT_WAIT_S = 120.0
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


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# What each field of a record must hold, by record kind: a line that fails is damaged (see read_log).
_IS = {
    str: lambda v: isinstance(v, str),
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    bool: lambda v: isinstance(v, bool),
    dict: lambda v: isinstance(v, dict),
    "number": _finite,
    "time": lambda v: _finite(v) and v > 0,
    "number or null": lambda v: v is None or _finite(v),
    "times": lambda v: isinstance(v, list) and bool(v) and all(_finite(x) and x > 0 for x in v),
}
_POINT_FIELDS = {f: {"N": int, "K": int, "M": int, "blocksize": int, "nested": bool, "cold": bool}.get(f, str)
                 for f in Point._fields}
RECORD_FIELDS = {
    "run": {"run_id": str, "identity": dict, "git_commit": str, "device_gbps": "number or null",
            "launch_us": "number or null"},
    "skip": {"run_id": str, "impl": str, "reason": str},
    "check": {"run_id": str, **_POINT_FIELDS},
    "error": {"run_id": str, **_POINT_FIELDS, "reason": str},
    "round": {"run_id": str, **_POINT_FIELDS, "timestamp": str, "attempt": int, "round": int, "rounds": int,
              "tolerance": "number", "time_us": "time", "time_us_lo": "time", "time_us_hi": "time",
              "samples": int, "host_us": "number", "timed_cold": bool, "samples_us": "times", "bytes": int},
}


def _damage(line: bytes) -> tuple[dict | None, str | None]:
    """(record, None) for a sound line, (None, what is wrong) for a damaged one."""
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        return None, "not UTF-8 text"
    except json.JSONDecodeError:
        return None, "not JSON (a write cut short by a kill?)"
    if not isinstance(record, dict):
        return None, f"a JSON {type(record).__name__}, not a record"
    kind = record.get("kind")
    if kind not in RECORD_FIELDS:
        return None, f"unknown kind {kind!r}"
    missing = [f for f in RECORD_FIELDS[kind] if f not in record]
    if missing:
        return None, f"a {kind!r} record without {', '.join(missing)}"
    wrong = [f for f, expected in RECORD_FIELDS[kind].items() if not _IS[expected](record[f])]
    if wrong:
        return None, f"a {kind!r} record with bad {', '.join(f'{f}={record[f]!r}' for f in wrong)}"[:200]
    if kind == "round" and not 0 <= record["round"] < record["rounds"]:
        return None, f"a 'round' record with round {record['round']} of {record['rounds']}"
    return record, None


def read_log(path) -> list[dict]:
    """The log's sound records. A damaged line (cut short by a kill, not UTF-8, not a record, a record
    without a field it needs or with a value of the wrong type) is skipped with a warning naming the file
    and line; so are the records of a run whose own line is damaged. The measurements they held are
    taken again by the next run."""
    records, damaged = [], []
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                record, why = _damage(line)
                if why:
                    damaged.append(f"line {number}: {why}")
                else:
                    records.append((number, record))
    runs = {r["run_id"] for _, r in records if r["kind"] == "run"}
    orphans = [number for number, r in records if r["run_id"] not in runs]
    if orphans:
        damaged.append(f"line(s) {', '.join(map(str, orphans[:5]))}{', ...' if len(orphans) > 5 else ''}: "
                       f"{len(orphans)} record(s) of a run whose own record is damaged")
    if damaged:
        warnings.warn(f"{path}: skipped unreadable or damaged lines ({'; '.join(damaged[:5])}"
                      f"{f'; and {len(damaged) - 5} more' if len(damaged) > 5 else ''}); running the sweep "
                      f"again re-measures what they held", stacklevel=2)
    return [r for _, r in records if r["run_id"] in runs]


def log_identity(records: list[dict], path) -> dict | None:
    """The one identity of a log's runs (None for a log without runs); several is an error."""
    identities = {json.dumps(r["identity"], sort_keys=True) for r in records if r["kind"] == "run"}
    if len(identities) > 1:
        raise SweepError(f"{path} holds runs of several devices/versions; compact each part separately")
    return json.loads(identities.pop()) if identities else None


def check_identity(logged: dict | None, identity: dict, path) -> None:
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


def finished_rows(records: list[dict], wanted: set[Point] | None = None) -> pl.DataFrame:
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
        logged = log_identity(records, path)
        if logged is None:
            raise SweepError(f"{path} holds no runs: it is not a q4lab sweep log")
        identities[str(path)] = logged
        run_ids |= {r["run_id"] for r in records if r["kind"] == "run"}
        frames.append(finished_rows(records))
        _warn_unfinished(records, path)
    if len({json.dumps(i, sort_keys=True) for i in identities.values()}) > 1:
        raise SweepError(f"these logs come from different devices/versions {identities}: compact each into "
                         f"its own dataset")
    new = pl.concat(frames)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    # one compaction at a time reads, merges and replaces the dataset: another would drop this one's rows
    with writer_lock.hold(writer_lock.lock_beside(out), f"dataset {out}", "compact into another --out",
                          wait_s=COMPACT_WAIT_S):
        if out.exists():
            old = dataset.load(out)
            check_dataset_identity(old, next(iter(identities.values())), out,
                                   "write to a new file (another --out)")
            new = pl.concat([old.filter(~pl.col("run_id").is_in(sorted(run_ids))), new])
        with writer_lock.replacing(out) as partial:
            new.write_parquet(partial)
    return new


def check_dataset_identity(old: pl.DataFrame, ident: dict, path: Path, remedy: str) -> None:
    """Refuse to add rows of identity `ident` to `old`, the dataset at `path`, when it holds rows of another
    device or version (a dataset never mixes them); `remedy` says what to do instead."""
    diff = {k: sorted(set(old[k].unique().to_list()) - {ident[k]}) for k in IDENTITY}
    diff = {k: v for k, v in diff.items() if v}
    if diff:
        raise SweepError(f"{path} holds rows of another device or version ({diff}; the rows to add: "
                         f"{ {k: ident[k] for k in diff} }): {remedy}")


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
