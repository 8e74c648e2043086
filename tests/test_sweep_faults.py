"""Faults and hostile input around a sweep: killed with SIGKILL at random moments and resumed, it ends
with exactly the points of an uninterrupted run; a second sweep on a held log is refused; damaged log
lines are skipped by name; unusable paths and impossible shapes are refused before anything is measured."""
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import pytest

from q4lab import bench, cli, runlog, sweep, writer_lock
from q4lab.shapes import Shape

REPO = Path(__file__).resolve().parent.parent
SHAPES = [Shape("tiny.a", "test/model", "a", 96, 128, "test", "test"),
          Shape("tiny.b", "test/model", "b", 64, 256, "test", "test")]
GRID = dict(ms=[1, 2, 3], dtypes=["fp32"], impls=["dense", "reference"], rounds=2, tol=1.0, progress=False)
WORKER = """
import sys, time
from q4lab import bench, sweep
from q4lab.shapes import Shape
real = bench.time_call
def slowly(call, **kw):  # wall-clock timings of tiny shapes, paced so that kills land mid-sweep
    time.sleep(0.02)
    return real(call, **kw | dict(budget_s=0.01))
bench.time_call = slowly
sweep.run_grid([Shape(*s) for s in eval(sys.argv[2])], log=sys.argv[1], **eval(sys.argv[3]))
"""


def _rounds(log: Path) -> list[tuple]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a line torn by a kill
        records = runlog.read_log(log) if log.exists() else []
    return [(tuple(r[f] for f in sweep.Point._fields), r["attempt"], r["round"])
            for r in records if r["kind"] == "round"]


@pytest.mark.slow
def test_a_sweep_killed_at_random_moments_loses_and_doubles_nothing(tmp_path, monkeypatch):
    log, rng = tmp_path / "grid.jsonl", random.Random(19)
    command = [sys.executable, "-c", WORKER, str(log), repr([tuple(s) for s in SHAPES]), repr(GRID)]
    kills = 0
    for _ in range(3):
        before = _rounds(log)
        taken = len(before)
        proc = subprocess.Popen(command, cwd=REPO, env=os.environ | {"PYTHONPATH": str(REPO)},
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 60
        while proc.poll() is None and len(_rounds(log)) == taken and time.time() < deadline:
            time.sleep(0.01)  # until this run has measured something ...
        time.sleep(rng.uniform(0, 0.15))  # ... then at a random moment, mid-write or not
        if proc.poll() is not None:
            assert proc.returncode == 0, proc.stderr.read().decode()
            break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
        after = _rounds(log)
        assert after[:taken] == before and len(after) > taken  # progress, and nothing taken rewritten
    assert kills == 3, "the sweep finished before it was killed often enough: slow the worker down"

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resumed = sweep.run_grid(SHAPES, log=log, **GRID)
    monkeypatch.setattr(bench, "time_call", lambda call, **kw: bench.Timing(
        10.0, 9.0, 11.0, 10, 20.0, "wall_clock", False, 0.0, 0, (10.0,) * 10))
    complete = sweep.run_grid(SHAPES, log=tmp_path / "complete.jsonl", **GRID)

    point = ["shape", "M", "dtype", "impl"]
    assert resumed.height == complete.height == 2 * 3 * 2
    assert sorted(resumed.select(point).rows()) == sorted(complete.select(point).rows())  # none lost
    assert resumed.select(point).is_unique().all()                                        # none twice
    rounds = _rounds(log)
    assert not [r for r, n in Counter(rounds).items() if n > 1]  # no (point, attempt, round) logged twice
    assert (resumed["rounds"] == 2).all()


def _fake_timing(call, **kw) -> bench.Timing:
    return bench.Timing(10.0, 9.0, 11.0, 10, 20.0, "wall_clock", False, 0.0, 0, (9.0, 10.0, 11.0))


def test_a_second_sweep_on_a_held_log_is_refused_naming_the_holder(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "time_call", _fake_timing)
    log = tmp_path / "grid.jsonl"
    sweep.run_grid(SHAPES[:1], log=log, **GRID)
    before = log.read_bytes()
    with writer_lock.hold(log.with_name(".grid.jsonl.lock"), "test", "wait"):
        with pytest.raises(writer_lock.BusyError, match=rf"sweep log {log} is in use by pid {os.getpid()} on host "
                                                        rf"{socket.gethostname()} since .*its own log \(--log"):
            sweep.run_grid(SHAPES, log=log, **GRID)
    assert log.read_bytes() == before  # nothing appended
    assert sweep.run_grid(SHAPES, log=log, **GRID).height == 2 * 3 * 2  # released: the next run goes on


@pytest.fixture(scope="module")
def sound_log(tmp_path_factory) -> bytes:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bench, "time_call", _fake_timing)
        log = tmp_path_factory.mktemp("log") / "grid.jsonl"
        sweep.run_grid(SHAPES, log=log, **GRID)
    return log.read_bytes()


def _round_with(sound_log: bytes, **fields) -> bytes:
    line = next(line for line in sound_log.splitlines() if b'"kind": "round"' in line)
    return json.dumps(json.loads(line) | fields).encode()


DAMAGED = {  # what the warning says -> the damaged line
    "a JSON int, not a record": lambda log: b"42",
    "a JSON list, not a record": lambda log: b'["round"]',
    "a 'round' record without sweep, shape": lambda log: b'{"kind": "round", "run_id": "x"}',
    "unknown kind 'teleport'": lambda log: b'{"kind": "teleport", "run_id": "x"}',
    "not UTF-8 text": lambda log: b'\xff\xfe{"kind": "run"}',
    "not JSON (a write cut short": lambda log: b'{"kind": "round", "run_i',
    "a 'round' record with bad time_us='fast'": lambda log: _round_with(log, time_us="fast"),
    "a 'round' record with bad M=2.5": lambda log: _round_with(log, M=2.5),
    "a 'round' record with bad samples_us=[]": lambda log: _round_with(log, samples_us=[]),
    "a 'round' record with round 7 of 2": lambda log: _round_with(log, round=7),
    "1 record(s) of a run whose own record is damaged": lambda log: _round_with(log, run_id="lost"),
}


@pytest.mark.parametrize("why", DAMAGED)
def test_a_damaged_log_line_is_skipped_naming_file_and_line(sound_log, tmp_path, why):
    log = tmp_path / "grid.jsonl"
    log.write_bytes(sound_log + DAMAGED[why](sound_log) + b"\n")
    n = sound_log.count(b"\n") + 1
    with pytest.warns(UserWarning) as caught:
        records = runlog.read_log(log)
    message = str(caught[0].message)
    assert message.startswith(f"{log}: skipped unreadable or damaged lines (line")
    assert f"{n}: {why}" in message and "re-measures what they held" in message
    assert len(records) == n - 1


def test_a_log_with_damaged_lines_resumes_and_compacts(sound_log, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "time_call", _fake_timing)
    log = tmp_path / "grid.jsonl"
    damaged = [line(sound_log) for line in DAMAGED.values()]
    first_round = next(i for i, line in enumerate(sound_log.splitlines()) if b'"kind": "round"' in line)
    lines = sound_log.splitlines()
    del lines[first_round]  # a round lost with a damaged line is measured again
    log.write_bytes(b"\n".join(lines[:first_round] + damaged + lines[first_round:]) + b"\n")
    with pytest.warns(UserWarning, match="damaged"):
        resumed = sweep.run_grid(SHAPES, log=log, **GRID)
    with pytest.warns(UserWarning, match="damaged"):
        compacted = runlog.compact(log, tmp_path / "grid.parquet")
        rounds = _rounds(log)
    assert resumed.height == compacted.height == 2 * 3 * 2 and (compacted["rounds"] == 2).all()
    assert len(rounds) == len(set(rounds)) == 2 * 3 * 2 * 2  # the lost round taken once more, no other


def test_an_unusable_out_or_log_is_refused_before_measuring(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    args = ["sweep", "grid", "--shapes", "qwen3-30b-a3b.expert_up", "--m", "1", "--dtypes", "fp32", "--impls",
            "dense", "--rounds", "1", "--no-progress"]
    for flags, message in [(["--out", str(a_file / "d.parquet")], f"--out {a_file / 'd.parquet'}: cannot create "
                                                                   f"its folder (File exists: {a_file})"),
                           (["--out", str(tmp_path)], f"--out {tmp_path}: that is a folder"),
                           (["--out", str(tmp_path / "d.parquet"), "--log", str(tmp_path)],
                            f"--log {tmp_path}: that is a folder")]:
        assert cli.main(args + flags) == 2
        assert f"q4lab sweep: error: {message}; give a file path" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # nothing measured, nothing written


def test_a_k_no_blocksize_divides_is_refused_in_a_few_words(capsys):
    assert cli.main(["sweep", "nsweep", "--k", "100", "--impls", "dense", "--out", "never.parquet"]) == 2
    err = capsys.readouterr().err
    assert ("K is not a multiple of blocksize 64 for 249 shape(s): n512_k100 (K=100), n576_k100 (K=100), "
            "n640_k100 (K=100), .... Blocksizes that divide K: K=100: none, K must be a multiple of 32.") in err
    assert len(err) < 400
    assert cli.main(["sweep", "nsweep", "--k", "96", "--impls", "dense", "--out", "never.parquet"]) == 2
    assert "Blocksizes that divide K: K=96: 32. Pick one (--blocksize)" in capsys.readouterr().err
    assert not Path("never.parquet").exists()


def test_a_refused_writer_names_a_holder_that_has_not_yet_written_its_line(tmp_path):
    """A holder takes the lock, then writes who it is: a writer refused in between waits for the line
    instead of naming 'another process'."""
    import threading

    import filelock
    lock_path = tmp_path / ".data.lock"
    taken = filelock.FileLock(lock_path)
    taken.acquire()
    threading.Timer(0.2, lambda: lock_path.write_text("pid 4242 on host elsewhere since now\n")).start()
    try:
        with pytest.raises(writer_lock.BusyError, match=r"data is in use by pid 4242 on host elsewhere"):
            with writer_lock.hold(lock_path, "data", "wait"):
                pass
    finally:
        taken.release()
