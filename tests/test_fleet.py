"""Sweeps on a Ray fleet: the `ray start` flags a node announces, the up-front cluster checks, device
datasets that never mix devices or double a point, and (slow) a real local Ray cluster of two CPUs
standing in for two GPU architectures, with a worker and the driver killed midway and the sweep resumed."""
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import polars as pl
import pytest

from q4lab import bench, dataset, fleet, runlog, sweep
from q4lab.shapes import Shape

REPO = Path(__file__).resolve().parent.parent


# --- this node -----------------------------------------------------------------------------------------

def test_resources_announce_one_custom_resource_per_arch(monkeypatch):
    archs = ["sm_90", "sm_90", "sm_89"]
    monkeypatch.setattr(fleet.torch.cuda, "device_count", lambda: len(archs))
    monkeypatch.setattr(fleet.bench, "device_facts", lambda device: {"arch": archs[int(str(device)[-1])]})
    gpus, counts = fleet.node_resources()
    assert (gpus, counts) == (3, {"sm_90": 2, "sm_89": 1})
    flags = fleet.ray_start_flags(gpus, counts)
    assert flags == """--num-gpus 3 --resources '{"arch:sm_89": 1, "arch:sm_90": 2}'"""
    words = subprocess.run(["sh", "-c", f'for w in {flags}; do echo "$w"; done'], capture_output=True,
                           text=True, check=True).stdout.splitlines()
    assert json.loads(words[-1]) == {"arch:sm_89": 1, "arch:sm_90": 2}   # one shell word, valid JSON


def test_a_cpu_announces_itself_only_when_it_stands_in_for_an_arch(monkeypatch):
    monkeypatch.setattr(fleet.torch.cuda, "device_count", lambda: 0)
    monkeypatch.delenv("Q4LAB_CPU_ARCH", raising=False)
    assert fleet.node_resources() == (0, {})
    with pytest.raises(fleet.FleetError, match="no GPU"):
        fleet.fleet_command(None)
    monkeypatch.setenv("Q4LAB_CPU_ARCH", "fake_a")
    assert fleet.node_resources() == (0, {"fake_a": 1})
    facts = bench.device_facts("cpu")
    assert facts["arch"] == "fake_a" and facts["device"].endswith(" as fake_a") and facts["vendor"] == "cpu"


# --- the cluster ---------------------------------------------------------------------------------------

CLUSTER = {"sm_90": {"devices": 2, "gpus": True, "hosts": ["box1"]},
           "gfx1201": {"devices": 1, "gpus": True, "hosts": ["box2"]}}


def test_archs_are_checked_up_front_and_a_missing_one_names_what_the_cluster_has():
    assert fleet.select_archs("all", CLUSTER) == ["gfx1201", "sm_90"]
    assert fleet.select_archs("sm_90, sm_90", CLUSTER) == ["sm_90"]
    with pytest.raises(fleet.FleetError, match=r"no node of the cluster has gfx942.*gfx1201 \(1 on box2\), "
                                               r"sm_90 \(2 on box1\)"):
        fleet.select_archs("sm_90,gfx942", CLUSTER)
    with pytest.raises(fleet.FleetError, match="no node of the Ray cluster announces"):
        fleet.select_archs("all", {})


def test_cluster_view_counts_devices_and_warns_about_gpu_nodes_that_announce_nothing(monkeypatch):
    class Ray:
        @staticmethod
        def nodes():
            return [{"Alive": True, "NodeManagerHostname": "box1", "Resources": {"GPU": 2.0, "arch:sm_90": 2.0}},
                    {"Alive": True, "NodeManagerHostname": "box3", "Resources": {"GPU": 1.0, "arch:sm_90": 1.0}},
                    {"Alive": False, "NodeManagerHostname": "box4", "Resources": {"GPU": 1.0, "arch:gfx942": 1.0}},
                    {"Alive": True, "NodeManagerHostname": "box5", "Resources": {"GPU": 4.0}},
                    {"Alive": True, "NodeManagerHostname": "head", "Resources": {"CPU": 8.0}}]

    monkeypatch.setattr(fleet, "_ray", lambda: Ray)
    with pytest.warns(UserWarning, match="box5 has 4 GPU.*announces no architecture"):
        archs = fleet.cluster_archs()
    assert archs == {"sm_90": {"devices": 3, "gpus": True, "hosts": ["box1", "box3"]}}


# --- device datasets -----------------------------------------------------------------------------------

def rows(host: str, arch: str, ms, time_us: float, **identity) -> pl.DataFrame:
    """Dataset rows of one device, one per M, from the synthetic dataset's row shape."""
    from q4lab import synthetic
    base = synthetic.synthetic_dataset(devices=("H100",)).row(0, named=True)
    times = {"time_us": time_us, "time_us_lo": time_us, "time_us_hi": time_us}
    frame = pl.DataFrame([base | {"host": host, "arch": arch, "M": M} | times | identity for M in ms],
                         schema=dataset.SCHEMA)
    return dataset.validate(frame)


def test_device_datasets_never_mix_devices_nor_double_a_point(tmp_path):
    out = tmp_path / "grid.parquet"
    written = fleet.write_rows(out, pl.concat([rows("box1", "sm_90", [1, 2], 5.0), rows("box2", "gfx1201", [1], 7.0)]))
    assert written == [tmp_path / "grid.box1.sm_90.parquet", tmp_path / "grid.box2.gfx1201.parquet"]
    assert not out.exists()
    fleet.write_rows(out, rows("box1", "sm_90", [2, 3], 6.0))          # M=2 again: replaced, not doubled
    box1 = dataset.load(written[0]).sort("M")
    assert box1["M"].to_list() == [1, 2, 3] and box1["time_us"].to_list() == [5.0, 6.0, 6.0]
    assert fleet.finished_points(out, ["sm_90", "gfx1201", "gfx942"]) == {
        "sm_90": {runlog.Point(*r) for r in box1.select(runlog.Point._fields).iter_rows()},
        "gfx1201": {runlog.Point(*r) for r in dataset.load(written[1]).select(runlog.Point._fields).iter_rows()},
        "gfx942": set()}
    with pytest.raises(runlog.SweepError, match=r"another device or version \(\{'torch_version'.*the rows to add: "
                                                r"\{'torch_version': '9.9'\}\): move it aside, or sweep into"):
        fleet.write_rows(out, rows("box1", "sm_90", [4], 6.0, torch_version="9.9"))
    assert dataset.load(written[0]).height == 3                      # and the refused rows changed nothing


def test_a_write_cut_short_leaves_the_device_dataset_whole_and_no_leftover(tmp_path, monkeypatch):
    out = tmp_path / "grid.parquet"
    [path] = fleet.write_rows(out, rows("box1", "sm_90", [1], 5.0))

    def torn(frame, file, *args, **kwargs):
        Path(file).write_bytes(b"PAR1 torn")
        raise OSError("disk full")

    monkeypatch.setattr(pl.DataFrame, "write_parquet", torn)
    with pytest.raises(OSError, match="disk full"):
        fleet.write_rows(out, rows("box1", "sm_90", [2], 6.0))
    monkeypatch.undo()
    assert dataset.load(path)["M"].to_list() == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".{path.name}.lock", path.name]  # the lock, no partial


def test_a_second_writer_waits_for_the_dataset_lock_and_keeps_both_runs_rows(tmp_path, monkeypatch):
    import threading
    from q4lab import writer_lock
    out = tmp_path / "grid.parquet"
    [path] = fleet.write_rows(out, rows("box1", "sm_90", [1], 5.0))
    lock = path.with_name(f".{path.name}.lock")
    held, release = threading.Event(), threading.Event()

    def other_driver():
        with writer_lock.hold(lock, "dataset", "elsewhere"):
            held.set()
            release.wait(5)

    thread = threading.Thread(target=other_driver)
    thread.start()
    held.wait(5)
    monkeypatch.setattr(fleet, "WRITE_WAIT_S", 0.05)
    with pytest.raises(writer_lock.BusyError, match=r"in use by pid .*sweep into another --out"):
        fleet.write_rows(out, rows("box1", "sm_90", [2], 6.0))
    assert dataset.load(path)["M"].to_list() == [1]
    monkeypatch.setattr(fleet, "WRITE_WAIT_S", 5)
    threading.Timer(0.3, release.set).start()
    started = time.monotonic()
    fleet.write_rows(out, rows("box1", "sm_90", [2], 6.0))
    thread.join()
    assert time.monotonic() - started >= 0.25 and sorted(dataset.load(path)["M"]) == [1, 2]


def test_a_dataset_from_before_the_host_column_loads_with_an_empty_host(tmp_path):
    old = rows("box1", "sm_90", [1], 5.0).drop("host")
    old.write_parquet(tmp_path / "old.parquet")
    assert dataset.load(tmp_path / "old.parquet")["host"].to_list() == [""]


def test_chunk_logs_are_named_by_host_arch_and_chunk():
    a, b = Shape("n64_k128", "", "", 64, 128, "nsweep", ""), Shape("n128_k128", "", "", 128, 128, "nsweep", "")
    assert fleet.chunk_log(Path("/runs/ns.jsonl"), "box1", "sm_90", sweep.Chunk((a, b), "nf4")) == \
        Path("/runs/ns.box1.sm_90/n64_k128..n128_k128.nf4.jsonl")
    assert fleet.chunk_name(sweep.Chunk((a,), "fp4")) == "n64_k128.fp4"


# --- the driver, on a stand-in for Ray ------------------------------------------------------------------

class FakeRay:
    """Ray as the driver uses it, in-process: a task's result is `outcome(arch, chunk index)` (rows, or an
    error to raise), and the architectures in `departed` leave the cluster once the sweep has started."""

    class exceptions:
        class RayError(Exception):
            pass

    def __init__(self, archs, outcome, departed=()):
        self.archs, self.outcome, self.departed = archs, outcome, set(departed)
        self.submitted, self.cancelled = [], []

    def init(self, **kwargs):
        pass

    def shutdown(self):
        pass

    def nodes(self):
        return [{"Alive": True, "NodeManagerHostname": f"box-{arch}", "Resources": {"GPU": 1.0, f"arch:{arch}": 1.0}}
                for arch in self.archs]

    def cluster_resources(self):
        return {f"arch:{arch}": 1.0 for arch in self.archs if arch not in self.departed}

    def remote(self, **kwargs):
        fake = self

        class Task:
            def options(self, resources, num_gpus):
                assert num_gpus == 1 and len(resources) == 1
                return self

            def remote(self, plan, index, arch, log, settings):
                fake.submitted.append((arch, index))
                return arch, index

        return lambda function: Task()

    def wait(self, refs, num_returns, timeout):
        ready = [ref for ref in refs if ref[0] not in self.departed][:num_returns]
        return ready, [ref for ref in refs if ref not in ready]

    def get(self, ref):
        result = self.outcome(*ref)
        if isinstance(result, Exception):
            raise result
        return result

    def cancel(self, ref, force):
        self.cancelled.append(ref)


def test_the_driver_writes_each_device_reports_failures_and_departures_and_resumes(tmp_path, monkeypatch):
    shapes = [Shape("tiny.a", "", "", 96, 128, "test", ""), Shape("tiny.b", "", "", 64, 128, "test", "")]
    plan = sweep.grid_plan(shapes, [1, 2], ["fp32"], ["dense"])
    base = rows("", "", [1], 1.0).row(0, named=True)

    def measured(arch, index):
        return pl.DataFrame([base | p._asdict() | {"host": f"box-{arch}", "arch": arch}
                             for p in plan.points(plan.chunks[index], plan.impls)], schema=dataset.SCHEMA)

    def outcome(arch, index):
        return FakeRay.exceptions.RayError("Traceback ...\nRuntimeError: kernel crashed") \
            if (arch, index) == ("fake_b", 1) else measured(arch, index)

    out, settings = tmp_path / "grid.parquet", dict(rounds=1, tol=0.05, max_remeasure=0)
    ray = FakeRay(["fake_a", "fake_b", "gone"], outcome, departed=["gone"])
    monkeypatch.setattr(fleet, "_ray", lambda: ray)
    monkeypatch.setattr(fleet, "WATCH_S", 0)
    with pytest.raises(RuntimeError) as err:
        fleet.run_on_ray(plan, settings, "auto", "all", out, tmp_path / "grid.jsonl", progress=False)
    message = str(err.value)
    assert message.startswith("3 chunk(s) not measured") and "run the same command again" in message
    assert "tiny.b.nf4 on fake_b: RuntimeError: kernel crashed" in message          # reported, not retried
    assert "tiny.a.nf4 on gone: no node of that architecture is left" in message    # not waited for
    assert sorted(ray.cancelled) == [("gone", 0), ("gone", 1)]
    assert dataset.load(tmp_path / "grid.box-fake_a.fake_a.parquet").height == 4
    assert dataset.load(tmp_path / "grid.box-fake_b.fake_b.parquet").height == 2

    ray = FakeRay(["fake_a", "fake_b"], measured)                     # run again: only what is missing
    monkeypatch.setattr(fleet, "_ray", lambda: ray)
    paths = fleet.run_on_ray(plan, settings, "auto", "all", out, tmp_path / "grid.jsonl", progress=False)
    assert ray.submitted == [("fake_b", 1)]
    assert [dataset.load(p).height for p in paths] == [4, 4]
    with pytest.raises(runlog.SweepError, match="rounds >= 1"):         # bad settings: refused before any task
        fleet.run_on_ray(plan, settings | {"rounds": 0}, "auto", "all", out, tmp_path / "grid.jsonl")


# --- a local Ray cluster of two fake architectures (slow) ------------------------------------------------

FLEET_SHAPES = ["llama-3.2-1b.kv_proj", "qwen3-30b-a3b.expert_up"]
FLEET_MS, FLEET_IMPLS = [1, 3], ["dense", "reference"]


def chunk_rounds(folder: Path) -> dict[Path, list[tuple]]:
    """(point, attempt, round) of every round in every chunk log under `folder`, in log order."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a line torn by a kill, if one was
        return {log: [(runlog.Point(*(r[f] for f in runlog.Point._fields)), r["attempt"], r["round"])
                      for r in runlog.read_log(log) if r["kind"] == "round"]
                for log in sorted(folder.glob("grid.*/*.jsonl"))}


def wait_for(condition, what: str, timeout_s: float = 60) -> None:
    deadline = time.time() + timeout_s
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def start_head(said: Path, temp_dir: str) -> tuple[subprocess.Popen, str]:
    """`ray start --head --block` on 127.0.0.1 with two CPUs standing in for fake_a and fake_b, ports of its own
    (no clash with another cluster on this machine); the process (in a session of its own) and its address,
    once it says it started, or once it died."""
    names = ["port", "node-manager-port", "object-manager-port", "ray-client-server-port", "metrics-export-port",
             "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port"]
    ports = dict(zip(names, free_ports(len(names))))
    with open(said, "w") as out:
        head = subprocess.Popen([str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
                                 "--node-ip-address", "127.0.0.1", "--num-cpus", "2", "--num-gpus", "0",
                                 "--resources", json.dumps({"arch:fake_a": 1, "arch:fake_b": 1}),
                                 "--include-dashboard", "false", "--disable-usage-stats", f"--temp-dir={temp_dir}",
                                 *(f"--{name}={port}" for name, port in ports.items())],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    wait_for(lambda: "Ray runtime started" in said.read_text() or head.poll() is not None, "ray start", 150)
    return head, f"127.0.0.1:{ports['port']}"


def stop_head(head: subprocess.Popen) -> None:
    head.terminate()                        # ray start --block stops what it started
    with contextlib.suppress(subprocess.TimeoutExpired):
        head.wait(timeout=20)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGKILL)


@pytest.fixture
def local_fleet(tmp_path, monkeypatch):
    """A one-node Ray cluster of two fake architectures (`start_head`): its address and its `ray start`
    process. Everything it started is stopped afterwards."""
    pytest.importorskip("ray")
    # no usage report, no token shared through ~/.ray with other clusters on this machine (this one listens
    # on loopback only), workers import this checkout
    for name, value in {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO),
                        "Q4LAB_GIT_COMMIT": "fleet"}.items():
        monkeypatch.setenv(name, value)
    temp_dir = tempfile.mkdtemp(prefix="q4ray-", dir="/tmp")  # its own sessions and address file; short for sockets
    heads = []
    try:
        for _ in range(2):                  # Ray gives its agents ~15 s to start: a busy machine may need a second go
            head, address = start_head(tmp_path / "ray.txt", temp_dir)
            heads.append(head)
            if head.poll() is None:
                break
        assert head.poll() is None, (tmp_path / "ray.txt").read_text()[-3000:]
        yield address, head
    finally:
        for head in heads:
            stop_head(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def measuring_workers(head) -> list:
    """The Ray worker processes of this test's cluster that are measuring a chunk now."""
    import psutil
    return [p for p in psutil.Process(head.pid).children(recursive=True)
            if p.cmdline()[:1] and p.cmdline()[0].startswith("ray::measure_chunk")]


@pytest.mark.slow
def test_a_grid_across_two_archs_survives_a_killed_worker_and_driver_with_every_point_once(tmp_path, local_fleet):
    address, head = local_fleet
    out = tmp_path / "grid.parquet"
    command = [sys.executable, "-m", "q4lab", "sweep", "grid", "--shapes", ",".join(FLEET_SHAPES),
               "--m", ",".join(map(str, FLEET_MS)), "--dtypes", "fp32", "--impls", ",".join(FLEET_IMPLS),
               "--rounds", "2", "--tol", "1", "--out", str(out), "--ray", address, "--arch", "all",
               "--no-progress"]
    with open(tmp_path / "driver.txt", "w") as said:
        driver = subprocess.Popen(command, cwd=tmp_path, stdout=said, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: sum(map(len, chunk_rounds(tmp_path).values())) >= 3 or driver.poll() is not None,
                 "the first rounds")
        assert driver.poll() is None, (tmp_path / "driver.txt").read_text()[-3000:]
        victims = measuring_workers(head)
        assert victims, "no worker was measuring"
        victims[0].kill()                                    # a worker killed midway: Ray runs its chunk again
        at_kill = sum(map(len, chunk_rounds(tmp_path).values()))
        wait_for(lambda: sum(map(len, chunk_rounds(tmp_path).values())) >= at_kill + 3, "rounds after the kill")
        assert driver.poll() is None, "the sweep finished before its driver could be killed"
        driver.kill()                                        # then the driver
        driver.wait()
    finally:
        if driver.poll() is None:
            driver.kill()
    before = chunk_rounds(tmp_path)
    rows_before = {p: dataset.load(p) for p in tmp_path.glob("grid.*.parquet")}

    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]

    host = socket.gethostname()
    assert sorted(p.name for p in tmp_path.glob("grid.*.parquet")) == [f"grid.{host}.fake_a.parquet",
                                                                        f"grid.{host}.fake_b.parquet"]
    expected = {(s, M, impl) for s in FLEET_SHAPES for M in FLEET_MS for impl in FLEET_IMPLS}
    for arch in ("fake_a", "fake_b"):
        frame = dataset.load(tmp_path / f"grid.{host}.{arch}.parquet")
        points = Counter(frame.select("shape", "M", "impl").iter_rows())
        assert points == Counter(expected), arch           # every point, exactly once, on its own device
        assert frame["arch"].unique().to_list() == [arch] and frame["host"].unique().to_list() == [host]
        assert frame["device"].str.ends_with(f" as {arch}").all()
    after = chunk_rounds(tmp_path)
    for log, taken in before.items():
        assert after[log][:len(taken)] == taken              # nothing taken was lost ...
    assert all(len(taken) == len(set(taken)) for taken in after.values())   # ... or taken twice
    runs = Counter(r["kind"] for log in after for r in runlog.read_log(log))["run"]
    assert runs > len(after), "no chunk was resumed"
    for path, old in rows_before.items():                    # rows written before the kill stand unchanged
        new = dataset.load(path)
        assert old.join(new, on=list(runlog.Point._fields), how="anti").height == 0
        assert old.join(new, on=[*runlog.Point._fields, "time_us"], how="anti").height == 0
