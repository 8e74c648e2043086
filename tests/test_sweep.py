"""Sweeps on the CPU impls: end to end into parquet, interleaved rounds and re-measurement, resuming after
an interruption or a kill with nothing lost or taken twice, the reference check, identities that never
mix, bad input, the multi-GPU split, the command line, and the shipped datasets."""
import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch

from q4lab import bench, dataset, dispatch, ops, runlog, sweep, sweep_cli
from q4lab.shapes import Shape

REPO = Path(__file__).resolve().parent.parent
TINY = [Shape("tiny.a", "test/model", "a", 96, 128, "test", "test"),
        Shape("tiny.b", "test/model", "b", 64, 256, "test", "test")]
CPU_IMPLS = ["reference", "dense", "dequant_blas"]


@pytest.fixture
def quick_clock(monkeypatch):
    """The real bench.time_call with a small sample budget: CPU timings of tiny shapes, quickly."""
    real = bench.time_call
    monkeypatch.setattr(bench, "time_call", lambda call, **kw: real(call, **kw | dict(budget_s=0.02)))


def log_records(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def rounds_of(records) -> list[tuple]:
    """(point, attempt, round) of every round record, in log order."""
    return [(sweep.Point(*(r[f] for f in sweep.Point._fields)), r["attempt"], r["round"])
            for r in records if r["kind"] == "round"]


def fake_timing(time_us: float) -> bench.Timing:
    return bench.Timing(time_us, 0.99 * time_us, 1.01 * time_us, 10, 2 * time_us, "wall_clock", False, 0.0, 0,
                        (time_us,) * 10)


@pytest.fixture
def fake_clock(monkeypatch):
    """bench.time_call replaced by a function of the call: (M, impl) -> µs, recording the order of calls."""
    calls = []
    times = {"fn": lambda M, impl, n: 10.0 + M}

    def time_call(call, **kw):
        if not hasattr(call, "keywords"):  # the device probes
            return fake_timing(100.0)
        key = (call.args[0].shape[0], call.keywords["impl"], call.args[1].N)
        calls.append(key)
        return fake_timing(times["fn"](key[0], key[1], sum(c == key for c in calls)))

    monkeypatch.setattr(bench, "time_call", time_call)
    return calls, times


# --- end to end ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_tiny_grid_end_to_end_into_parquet(tmp_path, quick_clock):
    log, out = tmp_path / "grid.jsonl", tmp_path / "grid.parquet"
    with pytest.warns(UserWarning, match="'simt' skipped"):
        frame = sweep.run_grid(TINY, [1, 5], ["fp32", "bf16"], CPU_IMPLS + ["simt"], log=log, rounds=2,
                               tol=1.0, progress=False)  # re-measuring: its own test
    dataset.validate(frame)
    assert frame.height == 2 * 2 * 2 * 3
    assert sorted(frame["impl"].unique()) == sorted(CPU_IMPLS)
    assert frame.select(["shape", "M", "dtype", "impl"]).is_unique().all()
    assert (frame["time_us"] > 0).all() and (frame["host_us"] > 0).all()
    assert (frame["rounds"] >= 2).all() and (frame["samples"] >= 20).all()
    assert (frame["time_us_lo"] <= frame["time_us_hi"]).all()
    assert frame["timer"].unique().to_list() == ["wall_clock"] and not frame["cold"].any()  # and says so
    assert (frame["flops"] == 2 * frame["M"] * frame["N"] * frame["K"]).all()
    gbps = frame["bytes"] / frame["time_us"] / 1e3
    assert ((frame["gbps"] - gbps).abs() < 1e-9 * gbps).all()
    assert frame["device_gbps"].n_unique() == 1 and frame["launch_us"].n_unique() == 1
    assert frame["device_gbps"][0] > 0 and frame["launch_us"][0] > 0

    records = log_records(log)
    assert [r["impl"] for r in records if r["kind"] == "skip"] == ["simt"]
    first_round = {}
    for i, r in enumerate(records):
        if r["kind"] == "round":
            first_round.setdefault(sweep.Point(*(r[f] for f in sweep.Point._fields)), i)
    checks = {sweep.Point(*(r[f] for f in sweep.Point._fields)): i for i, r in enumerate(records)
              if r["kind"] == "check"}
    assert checks.keys() == first_round.keys()
    assert all(checks[p] < first_round[p] for p in checks)  # checked before it is timed

    written = runlog.compact(log, out)
    loaded = dataset.load(out)
    assert loaded.height == written.height == frame.height
    row = loaded.row(0, named=True)
    assert row["device"].startswith("cpu: ") and row["vendor"] == "cpu" and row["runtime"] == "cpu"
    assert row["git_commit"] and row["torch_version"] and row["q4lab_version"] and row["run_id"]
    assert row["timestamp"].endswith("+00:00")


def test_rounds_interleave_in_rotating_order_and_use_the_median_of_round_medians(tmp_path, fake_clock):
    calls, times = fake_clock
    round_medians = {0: 10.0, 1: 12.0, 2: 11.0}
    times["fn"] = lambda M, impl, n: round_medians[(n - 1) % 3]
    frame = sweep.run_grid(TINY[:1], [1, 2], ["fp32"], ["dense", "dequant_blas"], log=tmp_path / "l.jsonl",
                           rounds=3, tol=0.5, progress=False)
    points = 4
    assert len(calls) == 3 * points
    by_round = [calls[r * points:(r + 1) * points] for r in range(3)]
    assert all(sorted(r) == sorted(by_round[0]) for r in by_round)   # every point once a round
    assert len({r[0] for r in by_round}) == 3                        # each round starts elsewhere
    assert frame["time_us"].to_list() == [11.0] * points
    assert frame["spread"].to_list() == pytest.approx([(12 - 10) / 11] * points)
    assert frame["stable"].all() and (frame["rounds"] == 3).all() and (frame["samples"] == 30).all()


def test_unsettled_points_are_measured_again_then_kept_as_unstable(tmp_path, fake_clock):
    calls, times = fake_clock
    times["fn"] = lambda M, impl, n: (10.0 if n % 2 else 20.0) if impl == "dense" else 10.0 + n % 2 * 0.1
    log = tmp_path / "l.jsonl"
    frame = sweep.run_grid(TINY[:1], [1], ["fp32"], ["dense", "dequant_blas"], log=log, rounds=3,
                           max_remeasure=2, progress=False)
    counts = Counter(impl for _, impl, _ in calls)
    assert counts == {"dense": 3 * 3, "dequant_blas": 3}
    rows = {r["impl"]: r for r in frame.iter_rows(named=True)}
    assert not rows["dense"]["stable"] and rows["dense"]["spread"] > 0.05 and rows["dense"]["rounds"] == 3
    assert rows["dequant_blas"]["stable"]
    attempts = {a for p, a, _ in rounds_of(log_records(log)) if p.impl == "dense"}
    assert attempts == {0, 1, 2}


# --- interruptions -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_interrupted_sweep_resumes_with_nothing_lost_or_taken_twice(tmp_path, monkeypatch, quick_clock):
    log = tmp_path / "grid.jsonl"
    real = bench.time_call
    taken = []

    def interrupt_after_five(call, **kw):
        if hasattr(call, "keywords"):
            taken.append(call)
            if len(taken) > 5:
                raise KeyboardInterrupt
        return real(call, **kw | dict(budget_s=0.02))

    monkeypatch.setattr(bench, "time_call", interrupt_after_five)
    with pytest.raises(KeyboardInterrupt):
        sweep.run_grid(TINY, [1, 3], ["fp32"], CPU_IMPLS, log=log, rounds=2, tol=1.0, progress=False)
    before = rounds_of(log_records(log))
    assert len(before) == 5
    with open(log, "ab") as f:
        f.write(b'{"kind": "round", "run_id": "torn-by-a-ki')  # a write cut short

    monkeypatch.setattr(bench, "time_call", real)
    with pytest.warns(UserWarning, match="unreadable"):
        frame = sweep.run_grid(TINY, [1, 3], ["fp32"], CPU_IMPLS, log=log, rounds=2, tol=1.0, progress=False)
    with pytest.warns(UserWarning, match="unreadable"):
        after = rounds_of(runlog.read_log(log))
    assert after[:5] == before                                   # nothing taken was lost ...
    assert len(after) == len(set(after))                         # ... or taken twice
    assert frame.height == 2 * 2 * 3 and frame.select(["shape", "M", "impl"]).is_unique().all()


KILLED_WORKER = """
import sys, time
from q4lab import bench, sweep
from q4lab.shapes import Shape
real = bench.time_call
def slow(call, **kw):
    time.sleep(0.05)
    return real(call, **kw | dict(budget_s=0.02))
bench.time_call = slow
shapes = [Shape(*s) for s in eval(sys.argv[2])]
sweep.run_grid(shapes, [1, 3], ["fp32"], ["reference", "dense", "dequant_blas"], log=sys.argv[1], rounds=2,
               tol=1.0, progress=False)
"""


@pytest.mark.slow
def test_killed_sweep_resumes_with_nothing_lost_or_taken_twice(tmp_path):
    log = tmp_path / "grid.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WORKER, str(log), repr([tuple(s) for s in TINY])],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and log.read_text().count('"kind": "round"') >= 4:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the sweep finished (or died) before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a line torn by the kill, if it hit one
        before = rounds_of(runlog.read_log(log))
    assert 4 <= len(before) < 2 * 2 * 3 * 2

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frame = sweep.run_grid(TINY, [1, 3], ["fp32"], CPU_IMPLS, log=log, rounds=2, tol=1.0, progress=False)
        after = rounds_of(runlog.read_log(log))
    assert after[:len(before)] == before
    assert len(after) == len(set(after))
    assert frame.height == 2 * 2 * 3 and frame.select(["shape", "M", "impl"]).is_unique().all()
    runs = [r["run_id"] for r in runlog.read_log(log) if r["kind"] == "run"]
    assert len(runs) == 2


NO_BNB_WORKER = """
import sys
import torch
from q4lab import bench, formats, ops, sweep
from q4lab.shapes import Shape
real = bench.time_call
bench.time_call = lambda call, **kw: real(call, **kw | dict(budget_s=0.005))
sweep.run_grid([Shape(*eval(sys.argv[1]))], [1], ["fp32"], ["dense"], rounds=1, tol=1.0, progress=False)
ops.gemm_4bit(torch.randn(1, 128), formats.quantize(torch.randn(8, 128), "nf4", 64, False), impl="auto")
print("before bnb:", "bitsandbytes" in sys.modules)
ops.available_impls("cpu", ("bnb",))
print("after bnb:", "bitsandbytes" in sys.modules)
"""


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="nothing could import it")
def test_only_impl_bnb_imports_bitsandbytes(tmp_path):
    """Importing bitsandbytes takes seconds: a sweep, and auto (here a rule for this CPU that picks dense),
    do it only when they ask for impl bnb."""
    rule = tmp_path / "rule.json"
    arch = ops.device_arch(torch.device("cpu"))
    rule.write_text(dispatch.Rule("per_dtype", ["dense"], {(arch, "*", "*", "*"): {"steps": [[None, "dense"]]}}).to_json())
    done = subprocess.run([sys.executable, "-c", NO_BNB_WORKER, repr(tuple(TINY[0]))], cwd=REPO, timeout=120,
                          env=os.environ | {"Q4LAB_DISPATCH": str(rule)}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["before bnb: False", "after bnb: True"]


# --- the reference check -------------------------------------------------------------------------------

def test_a_wrong_or_failing_impl_is_an_error_row_and_not_timed(tmp_path, monkeypatch, quick_clock):
    real = ops.gemm_4bit

    def broken(A, w, bias=None, impl="reference"):
        if impl == "dequant_blas":
            raise RuntimeError("kernel launch failed")
        out = real(A, w, bias, impl)
        return out + 1 if impl == "dense" else out

    monkeypatch.setattr(ops, "gemm_4bit", broken)
    log = tmp_path / "l.jsonl"
    with pytest.warns(UserWarning) as caught:
        frame = sweep.run_grid(TINY[:1], [1, 4], ["fp16"], CPU_IMPLS, log=log, rounds=1, progress=False)
    messages = " ".join(str(w.message) for w in caught)
    assert "differs from the reference" in messages and "raised RuntimeError" in messages
    assert frame["impl"].unique().to_list() == ["reference"]
    records = log_records(log)
    errors = {(r["impl"], r["M"]) for r in records if r["kind"] == "error"}
    assert errors == {("dense", 1), ("dense", 4), ("dequant_blas", 1), ("dequant_blas", 4)}
    assert {p.impl for p, _, _ in rounds_of(records)} == {"reference"}
    # a resumed sweep does not retry them
    frame = sweep.run_grid(TINY[:1], [1, 4], ["fp16"], CPU_IMPLS, log=log, rounds=1, progress=False)
    assert len(rounds_of(log_records(log))) == 2


@pytest.mark.parametrize("quant_type, nested", [("nf4", True), ("fp4", False)])
def test_correct_impls_pass_the_check_for_every_format(tmp_path, fake_clock, quant_type, nested):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an error row would warn
        frame = sweep.run_grid(TINY[:1], [1, 7], ["fp16", "bf16", "fp32"], CPU_IMPLS, quant_types=[quant_type],
                               nested=nested, log=tmp_path / "l.jsonl", rounds=1, progress=False)
    assert frame.height == 2 * 3 * 3 and (frame["nested"] == nested).all()
    checks = [r for r in log_records(tmp_path / "l.jsonl") if r["kind"] == "check"]
    assert len(checks) == frame.height and max(r["error"] for r in checks) < 1e-2


# --- identities ----------------------------------------------------------------------------------------

def rewrite_identity(src: Path, dst: Path, **changes) -> None:
    lines = []
    for rec in log_records(src):
        if rec["kind"] == "run":
            rec["identity"] |= changes
            rec["run_id"] = "other-" + rec["run_id"]
        elif "run_id" in rec:
            rec["run_id"] = "other-" + rec["run_id"]
        lines.append(json.dumps(rec))
    dst.write_text("\n".join(lines) + "\n")


def test_a_log_of_another_device_is_refused(tmp_path, fake_clock):
    log = tmp_path / "l.jsonl"
    sweep.run_grid(TINY[:1], [1], ["fp32"], ["dense"], log=log, rounds=1, progress=False)
    other = tmp_path / "other.jsonl"
    rewrite_identity(log, other, device="NVIDIA H100 80GB HBM3", vendor="nvidia")
    with pytest.raises(sweep.SweepError, match="write to a new log"):
        sweep.run_grid(TINY[:1], [1, 2], ["fp32"], ["dense"], log=other, rounds=1, progress=False)


def test_compact_is_idempotent_appends_runs_and_never_mixes_identities(tmp_path, fake_clock):
    log, out = tmp_path / "l.jsonl", tmp_path / "d.parquet"
    sweep.run_grid(TINY, [1], ["fp32"], ["dense"], log=log, rounds=1, progress=False)
    assert runlog.compact(log, out).height == 2
    assert runlog.compact(log, out).height == 2             # again: replaced, not doubled
    second = tmp_path / "second.jsonl"
    rewrite_identity(log, second)                          # another run on the same device
    assert runlog.compact(second, out).height == 4
    foreign = tmp_path / "foreign.jsonl"
    rewrite_identity(log, foreign, q4lab_version="9.9.9")
    with pytest.raises(sweep.SweepError, match="write to a new file"):
        runlog.compact(foreign, out)
    with pytest.raises(sweep.SweepError, match="different devices"):
        runlog.compact([log, foreign], tmp_path / "new.parquet")
    assert dataset.load(out).height == 4


def test_compact_names_missing_empty_and_corrupt_files(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no log"):
        runlog.compact(tmp_path / "missing.jsonl", tmp_path / "d.parquet")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(sweep.SweepError, match="not a q4lab sweep log"):
        runlog.compact(empty, tmp_path / "d.parquet")
    bad = tmp_path / "bad.parquet"
    bad.write_text("not parquet")
    log = tmp_path / "l.jsonl"
    monkeypatch.setattr(bench, "time_call", lambda call, **kw: fake_timing(10.0))
    sweep.run_grid(TINY[:1], [1], ["fp32"], ["dense"], log=log, rounds=1, progress=False)
    with pytest.raises(dataset.DatasetError):
        runlog.compact(log, bad)


# --- bad input -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(impls=["dense", "fused"]), "unknown impl 'fused'; valid: simt, mma, gemv"),
    (dict(dtypes=["fp8"]), "unknown dtype 'fp8'; valid: fp16, bf16, fp32"),
    (dict(shapes=["llama3-8b.kv"]), "close matches"),
    (dict(quant_types=["int4"]), "unknown quant type 'int4'"),
    (dict(ms=[0, 1]), "positive integers"),
    (dict(blocksize=48), "blocksize 48"),
    (dict(blocksize=256, shapes=[Shape("k128", "", "", 64, 128, "test", "")]), "not a multiple of blocksize 256"),
    (dict(rounds=0), "rounds >= 1"),
    (dict(sweep="final"), "sweep label"),
])
def test_bad_grid_input_is_refused_with_the_fix(tmp_path, kwargs, message):
    args = dict(shapes=TINY[:1], ms=[1], dtypes=["fp32"], impls=["dense"], log=tmp_path / "l.jsonl",
                progress=False) | kwargs
    with pytest.raises(ValueError, match=message):
        sweep.run_grid(**args)
    assert not (tmp_path / "l.jsonl").exists()


def test_bad_nsweep_range_is_refused():
    with pytest.raises(sweep.SweepError, match="N range"):
        sweep.run_nsweep(128, [1], 512, 256, 64, ["dense"])
    with pytest.raises(sweep.SweepError, match="N range"):
        sweep.run_nsweep(128, [1], 64, 256, 0, ["dense"])


def test_nsweep_points(tmp_path, fake_clock):
    frame = sweep.run_nsweep(128, [1, 8], 64, 64 * 10, 64, ["dense"], dtypes=("fp32",), log=tmp_path / "n.jsonl",
                             rounds=1, progress=False)
    dataset.validate(frame)
    assert sorted(frame["N"].unique()) == list(range(64, 641, 64))
    assert set(frame["shape"]) == {f"n{N}_k128" for N in range(64, 641, 64)}
    assert frame["family"].unique().to_list() == ["nsweep"] and frame["sweep"].unique().to_list() == ["nsweep"]
    assert frame.height == 10 * 2


# --- several GPUs --------------------------------------------------------------------------------------

def test_split_covers_every_chunk_once_and_balances():
    costs = [10.0, 1.0, 1.0, 1.0, 1.0, 9.0, 5.0, 5.0, 3.0]
    parts = sweep.split_chunks(costs, 3)
    assert sorted(i for p in parts for i in p) == list(range(len(costs)))
    loads = [sum(costs[i] for i in p) for p in parts]
    assert max(loads) - min(loads) <= max(costs)
    assert all(p == sorted(p) for p in parts)
    assert sweep.split_chunks(costs, 3) == parts               # every worker computes the same split
    assert sweep.split_chunks(costs, 1) == [list(range(len(costs)))]
    assert sweep.split_chunks([1.0], 4) == [[0], [], [], []]


def test_parts_of_a_grid_add_up_to_the_grid(tmp_path, fake_clock):
    shapes = [Shape(f"s{i}", "", "", 64 * (i + 1), 128, "test", "") for i in range(5)]
    frames = [sweep.run_grid(shapes, [1], ["fp32"], ["dense"], log=tmp_path / f"p{i}.jsonl", rounds=1,
                             progress=False, part=(i, 2)) for i in range(2)]
    names = [set(f["shape"]) for f in frames]
    assert names[0] and names[1] and not names[0] & names[1] and names[0] | names[1] == {s.name for s in shapes}
    merged = runlog.compact([tmp_path / "p0.jsonl", tmp_path / "p1.jsonl"], tmp_path / "all.parquet")
    assert merged.height == 5


def test_gpu_list_on_a_host_without_gpus(monkeypatch):
    assert sweep_cli.gpu_list(None) is None
    monkeypatch.setattr(sweep_cli.torch.cuda, "device_count", lambda: 0)
    with pytest.raises(sweep.SweepError, match="no GPU"):
        sweep_cli.gpu_list("all")
    monkeypatch.setattr(sweep_cli.torch.cuda, "device_count", lambda: 4)
    assert sweep_cli.gpu_list("all") == [0, 1, 2, 3]
    assert sweep_cli.gpu_list("2,0,2") == [2, 0]
    with pytest.raises(sweep.SweepError, match="do not exist"):
        sweep_cli.gpu_list("1,7")
    assert sweep_cli.part_logs(Path("runs/h100.jsonl"), [0, 3]) == [Path("runs/h100.gpu0.jsonl"),
                                                                Path("runs/h100.gpu3.jsonl")]


def test_run_on_gpus_starts_one_worker_per_gpu_on_its_own_part_and_log(monkeypatch, tmp_path):
    started = []

    class Worker:
        def __init__(self, argv, env):
            started.append((argv, env))
            self.part = json.loads(argv[-1])["part"][0]

        def wait(self):
            return 1 if fail and self.part == 1 else 0

    monkeypatch.setattr(sweep_cli.subprocess, "Popen", Worker)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")
    fail = False
    logs = sweep_cli.run_on_gpus("run_grid", {"shapes": "all", "ms": [1]}, [0, 2], tmp_path / "h100.jsonl")
    assert logs == [tmp_path / "h100.gpu0.jsonl", tmp_path / "h100.gpu2.jsonl"]
    assert [env["CUDA_VISIBLE_DEVICES"] for _, env in started] == ["4", "6"]   # physical ids behind 0 and 2
    kwargs = [json.loads(argv[-1]) for argv, _ in started]
    assert [k["part"] for k in kwargs] == [[0, 2], [1, 2]]
    assert [k["log"] for k in kwargs] == [str(log) for log in logs]
    assert all(k["device"] == "cuda:0" and k["shapes"] == "all" for k in kwargs)
    assert all(argv[-2] == "run_grid" for argv, _ in started)
    fail = True
    with pytest.raises(RuntimeError, match=r"GPU\(s\) \[2\].*resume"):
        sweep_cli.run_on_gpus("run_grid", {"shapes": "all", "ms": [1]}, [0, 2], tmp_path / "h100.jsonl")


# --- command line --------------------------------------------------------------------------------------

def cli(*argv) -> int:
    parser = argparse.ArgumentParser()
    sweep_cli.add_sweep_arguments(parser)
    return sweep_cli.sweep_command(parser.parse_args(list(argv)))


def test_command_line_grid_resume_and_compact(tmp_path, capsys, quick_clock):
    out = tmp_path / "cpu.parquet"
    args = ["grid", "--shapes", "qwen3-30b-a3b.expert_up", "--m", "1,2", "--dtypes", "fp32",
            "--impls", "dense,reference", "--rounds", "1", "--out", str(out), "--no-progress"]
    assert cli(*args) == 0
    log = tmp_path / "cpu.jsonl"                    # the default log sits beside --out
    taken = len(rounds_of(log_records(log)))
    assert taken >= 4 and dataset.load(out).height == 4
    assert cli(*args) == 0                          # the same command again: everything is done
    assert len(rounds_of(log_records(log))) == taken
    assert cli("compact", str(log), "--out", str(tmp_path / "again.parquet")) == 0
    assert dataset.load(tmp_path / "again.parquet").height == 4
    assert "4 rows" in capsys.readouterr().out
    with pytest.raises(sweep.SweepError, match="unknown impl"):
        cli("grid", "--impls", "fast", "--out", str(out))
    with pytest.raises(SystemExit):
        cli("grid", "--m", "1,x", "--out", str(out))


# --- shipped datasets ----------------------------------------------------------------------------------

SHIPPED = sorted((REPO / "data").glob("*.parquet"))


def test_measured_datasets_are_shipped():
    assert SHIPPED, "data/ holds no parquet dataset: the notebooks and `make report` default to data/*.parquet"
    assert any(dataset.load(p)["sweep"].eq("grid").any() for p in SHIPPED), "no M-grid dataset"
    assert any(dataset.load(p)["sweep"].eq("nsweep").any() for p in SHIPPED), "no N-sweep dataset"


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_dataset_validates_and_carries_its_provenance(path):
    df = dataset.load(path)
    assert df.height > 0
    for column in ("device", "vendor", "arch", "runtime", "torch_version", "q4lab_version", "git_commit",
                   "timestamp", "run_id", "timer"):
        assert df[column].null_count() == 0 and (df[column].str.len_chars() > 0).all(), column
    assert df["device"].n_unique() == 1 and df["q4lab_version"].n_unique() == 1
    assert (df["git_commit"] != "unknown").all()
    assert (df["time_us"] > 0).all() and (df["device_gbps"] > 0).all() and (df["launch_us"] > 0).all()
    assert path.name in (REPO / "data" / "README.md").read_text(), "data/README.md must describe every file"


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_dataset_names_a_commit_whose_kernels_it_measured(path, tmp_path):
    # Q4LAB_GIT_COMMIT is typed by hand when a sweep runs on a copy of the tree: a typo or a dirty tree
    # would leave rows that no checkout can reproduce
    from q4lab import kernels
    if subprocess.run(["git", "-C", str(REPO), "rev-parse", "--git-dir"], capture_output=True).returncode:
        pytest.skip("not a git checkout: the recorded commits cannot be looked up")
    shallow = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--is-shallow-repository"],
                             capture_output=True, text=True).stdout.strip() == "true"
    pairs = dataset.load(path).select("git_commit", "kernel_hash").unique().iter_rows()
    for commit, kernel_hash in pairs:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", commit, "kernels"],
                                 capture_output=True)
        if archive.returncode and shallow:
            pytest.skip(f"shallow clone: commit {commit} may lie outside it (git fetch --unshallow to check)")
        assert archive.returncode == 0, (
            f"{path.name}: git_commit {commit!r} is not a commit of this repository "
            f"({archive.stderr.decode().strip()}); the rows must name the clean commit they were measured from")
        tree = tmp_path / commit  # one folder a commit: a file another commit lacks must not linger
        tree.mkdir()
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
        # rows recorded before the hash ignored comments carry the raw-byte hash of the same sources
        hashes = (kernels.source_hash(tree / "kernels"), kernels.raw_byte_hash(tree / "kernels"))
        assert kernel_hash in hashes, (
            f"{path.name}: commit {commit}'s kernels/ hash to {hashes[0]} (raw bytes {hashes[1]}), not to the "
            f"recorded {kernel_hash}")


def test_auto_dispatch_thresholds_are_the_ones_the_shipped_grid_fits():
    from q4lab import analysis, ops
    summary = analysis.crossover_summary(dataset.load(REPO / ops.AUTO_DATASET))
    fitted = dict(summary.select("dtype", "threshold_m").iter_rows())
    assert fitted == ops.AUTO_SIMT_MAX_M, "re-fit q4lab.ops.AUTO_SIMT_MAX_M (and README) to the shipped grid"
