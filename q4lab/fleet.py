"""Sweeps across the GPUs of several hosts, on Ray.

A fleet is a Ray cluster whose nodes announce their GPUs by architecture: on every machine,
`ray start ... $(q4lab fleet resources)` adds one custom resource "arch:<arch>" per architecture present,
counting its GPUs (besides --num-gpus). `q4lab sweep grid|nsweep ... --ray ADDRESS --arch A,B|all` then:
- checks up front that the cluster holds every asked architecture (a missing one is an error naming what
  the cluster has; a GPU node that announces none is warned about, since it will take no work);
- makes one Ray task per (chunk, architecture), holding one unit of "arch:<arch>" and one GPU: it runs on
  one GPU of that architecture, on whichever node has one free;
- a task measures its chunk with the sweep's own runner and log, on its node: one log per chunk in
  `<log stem>.<host>.<arch>/` beside the --log path, so that a chunk resumes on any GPU of that node;
- the driver writes each finished chunk's rows into that device's dataset, `<out stem>.<host>.<arch>.parquet`
  beside --out (a dataset never mixes devices; rows of the same point are replaced, never doubled), with a
  progress bar per architecture.

Faults: logs are fsynced round by round, so a killed task, node or driver loses nothing measured. Ray
retries a task whose worker or node died (on any node of its architecture); running the command again
sends every unfinished chunk again, and a task whose chunk log has finished points returns them without
measuring. A point that fails its check or raises is an error record in its log and is never retried. A
chunk whose task keeps failing, or whose architecture has left the cluster, is reported at the end.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import shlex
import socket
import warnings
from pathlib import Path

import polars as pl
import torch
from tqdm.auto import tqdm

from q4lab import bench, dataset, runlog, sweep, writer_lock

RESOURCE = "arch:"            # custom resource prefix: "arch:sm_90", "arch:gfx1201"
TASK_RETRIES = 2              # Ray's retries of a task whose worker or node died
WATCH_S = 5.0                 # how often the driver checks that the architectures it waits for are still there


class FleetError(ValueError):
    """A fleet sweep that cannot run as asked: no cluster, or an architecture the cluster lacks."""


# ------------------------------------------------------------------------------------------ this node

def node_resources() -> tuple[int, dict[str, int]]:
    """(GPUs, {arch: count}) of this machine. Without a GPU, the CPU counts as one device only where
    Q4LAB_CPU_ARCH names it (tests stand CPUs in for GPU architectures this way)."""
    archs: dict[str, int] = {}
    count = torch.cuda.device_count()
    for i in range(count):
        arch = bench.device_facts(f"cuda:{i}")["arch"]
        archs[arch] = archs.get(arch, 0) + 1
    if not count and os.environ.get("Q4LAB_CPU_ARCH"):
        archs[bench.device_facts("cpu")["arch"]] = 1
    return count, archs


def ray_start_flags(gpus: int, archs: dict[str, int]) -> str:
    """The `ray start` flags announcing these devices, quoted for a shell."""
    resources = json.dumps({RESOURCE + arch: n for arch, n in sorted(archs.items())})
    return f"--num-gpus {gpus} --resources {shlex.quote(resources)}"


# ------------------------------------------------------------------------------------------ the cluster

def _ray():
    try:
        import ray
    except ImportError:
        raise FleetError("--ray needs Ray: pip install -e '.[fleet]' (or use --gpus all on one host)") from None
    return ray


def connect(address: str) -> None:
    """Join the Ray cluster at `address` ("auto": the one this machine's `ray start` joined)."""
    ray = _ray()
    try:
        ray.init(address=address, logging_level="warning", configure_logging=True)
    except ConnectionError as err:
        raise FleetError(f"no Ray cluster at {address!r} ({err}); start one with "
                         f"`eval \"ray start --head $(q4lab fleet resources)\"` (see README.md, Fleets)") from None


def cluster_archs() -> dict[str, dict]:
    """{arch: {"devices": count, "gpus": whether its nodes have GPUs, "hosts": [...]}} over the cluster's
    live nodes. Warns about GPU nodes that announce no architecture: they take no sweep work."""
    archs: dict[str, dict] = {}
    for node in _ray().nodes():
        if not node["Alive"]:
            continue
        res, host = node["Resources"], node["NodeManagerHostname"]
        announced = [k for k in res if k.startswith(RESOURCE)]
        if res.get("GPU") and not announced:
            warnings.warn(f"node {host} has {res['GPU']:g} GPU(s) but announces no architecture, so it takes no "
                          f"sweep work: restart it with `ray start ... $(q4lab fleet resources)`", stacklevel=2)
        for key in announced:
            entry = archs.setdefault(key[len(RESOURCE):], {"devices": 0, "gpus": False, "hosts": []})
            entry["devices"] += int(res[key])
            entry["gpus"] |= bool(res.get("GPU"))
            entry["hosts"].append(host)
    return archs


def select_archs(spec: str, available: dict[str, dict]) -> list[str]:
    """`--arch`: "all" (every announced architecture) or comma-separated names, each of which must be there."""
    have = ", ".join(f"{arch} ({v['devices']} on {', '.join(sorted(set(v['hosts'])))})"
                     for arch, v in sorted(available.items()))
    if not available:
        raise FleetError("no node of the Ray cluster announces a GPU architecture: start each worker with "
                         "`eval \"ray start --address HEAD:6379 $(q4lab fleet resources)\"`")
    if spec == "all":
        return sorted(available)
    asked = list(dict.fromkeys(a.strip() for a in spec.split(",") if a.strip()))
    missing = [a for a in asked if a not in available]
    if missing or not asked:
        raise FleetError(f"--arch {spec!r}: no node of the cluster has {', '.join(missing) or 'any of them'}; it has "
                         f"{have}. Start a worker there, or leave it out of --arch")
    return asked


# ------------------------------------------------------------------------------------------ one task

def chunk_name(chunk: sweep.Chunk) -> str:
    """A chunk's stable file name: its first (and last) shape and its quant type."""
    last = f"..{chunk.shapes[-1].name}" if len(chunk.shapes) > 1 else ""
    return f"{chunk.shapes[0].name}{last}.{chunk.quant_type}"


def chunk_log(log: Path, host: str, arch: str, chunk: sweep.Chunk) -> Path:
    return log.parent / f"{log.stem}.{host}.{arch}" / f"{chunk_name(chunk)}{log.suffix}"


def measure_chunk(plan: sweep.Plan, index: int, arch: str, log: str, settings: dict) -> pl.DataFrame:
    """On a worker: chunk `index` of `plan` on the GPU Ray gave this task (the CPU on a node without GPUs),
    into the chunk's log on this node; its finished rows."""
    if _ray().get_gpu_ids():
        device = "cuda:0"      # Ray makes the GPU it gave this task the only one visible
    else:                      # a node without GPUs announced its CPU as a stand-in for `arch`
        device, os.environ["Q4LAB_CPU_ARCH"] = "cpu", arch
    chunk = plan.chunks[index]
    path = chunk_log(Path(log), socket.gethostname(), arch, chunk)
    return sweep.run_plan(dataclasses.replace(plan, chunks=(chunk,)), device=device, log=path, progress=False,
                          part=None, **settings)


# ------------------------------------------------------------------------------------------ the driver

def device_dataset(out: Path, host: str, arch: str) -> Path:
    return out.with_name(f"{out.stem}.{host}.{arch}{out.suffix}")


WRITE_WAIT_S = 60  # another driver writing the same device dataset holds it for a read and a write


def write_rows(out: Path, rows: pl.DataFrame) -> list[Path]:
    """Add `rows` (one run's rows per device) to their devices' datasets beside `out`, replacing rows of the
    same points; return the paths."""
    written, key = [], list(runlog.Point._fields)
    for (host, arch), new in rows.group_by(["host", "arch"], maintain_order=True):
        path = device_dataset(out, host, arch)
        # Read, merge and replace under the dataset's lock (the one `q4lab sweep compact` takes), so a second
        # driver on the same --out waits its turn instead of dropping the other's rows.
        with writer_lock.hold(writer_lock.lock_beside(path), f"dataset {path}", "sweep into another --out",
                              wait_s=WRITE_WAIT_S):
            if path.exists():
                old = dataset.load(path)
                runlog.check_dataset_identity(old, new.select(runlog.IDENTITY).row(0, named=True), path,
                                              "move it aside, or sweep into another --out")
                new = pl.concat([old.join(new.select(key), on=key, how="anti"), new])
            with writer_lock.replacing(path) as partial:
                new.write_parquet(partial)
        written.append(path)
    return written


def device_datasets(out: Path, arch: str) -> list[Path]:
    """This sweep's datasets of `arch`, one per host."""
    return sorted(Path(p) for p in glob.glob(str(device_dataset(out, "*", arch))))


def finished_points(out: Path, archs: list[str]) -> dict[str, set[runlog.Point]]:
    """The points that already have a row in this sweep's device datasets, by architecture."""
    return {arch: {runlog.Point(*row) for path in device_datasets(out, arch)
                   for row in dataset.load(path).select(runlog.Point._fields).iter_rows()} for arch in archs}


def run_on_ray(plan: sweep.Plan, settings: dict, address: str, arch_spec: str, out: Path, log: Path,
               progress: bool = True) -> list[Path]:
    """Measure `plan` on every asked architecture of the cluster at `address`; return their device datasets."""
    sweep.validate(plan, **settings)
    ray = _ray()
    connect(address)
    try:
        available = cluster_archs()
        archs = select_archs(arch_spec, available)
        done = finished_points(out, archs)
        task = ray.remote(max_retries=TASK_RETRIES)(measure_chunk)
        pending, bars = {}, {}
        for position, arch in enumerate(archs):
            chunks = [(i, len(plan.points(c, plan.impls))) for i, c in enumerate(plan.chunks)
                      if not set(plan.points(c, plan.impls)) <= done[arch]]
            bars[arch] = tqdm(total=sum(n for _, n in chunks), unit="point", desc=f"{plan.sweep} on {arch}",
                              position=position, disable=not progress, dynamic_ncols=True)
            options = dict(resources={RESOURCE + arch: 1}, num_gpus=1 if available[arch]["gpus"] else 0)
            for i, n in chunks:
                pending[task.options(**options).remote(plan, i, arch, str(log.resolve()), settings)] = (arch, i, n)
        failed = []
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=WATCH_S)
            if not ready:
                failed += _drop_departed(ray, pending, plan)
                continue
            arch, i, n = pending.pop(ready[0])
            try:
                rows = ray.get(ready[0])
            except ray.exceptions.RayError as err:
                failed.append(f"{chunk_name(plan.chunks[i])} on {arch}: {str(err).strip().splitlines()[-1]}")
            else:
                write_rows(out, rows)
                bars[arch].set_postfix_str(", ".join(sorted({h for h in rows["host"]})))
            bars[arch].update(n)
        for bar in bars.values():
            bar.close()
    finally:
        ray.shutdown()
    datasets = [path for arch in archs for path in device_datasets(out, arch)]
    if failed:
        raise RuntimeError(f"{len(failed)} chunk(s) not measured: {'; '.join(failed)}. Rows measured so far are "
                           f"in {', '.join(map(str, datasets)) or 'the logs'}; run the same command again to "
                           f"resume")
    return datasets


def _drop_departed(ray, pending: dict, plan: sweep.Plan) -> list[str]:
    """Cancel the tasks of architectures no live node has any more (a node left or died): report them
    rather than wait for a node that may never come back."""
    present = {k[len(RESOURCE):] for k in ray.cluster_resources() if k.startswith(RESOURCE)}
    failed = []
    for ref, (arch, i, n) in list(pending.items()):
        if arch not in present:
            ray.cancel(ref, force=True)
            del pending[ref]
            failed.append(f"{chunk_name(plan.chunks[i])} on {arch}: no node of that architecture is left")
    return failed


# ------------------------------------------------------------------------------------------ command line

def add_fleet_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="fleet_command", required=True)
    sub.add_parser("resources", help="the `ray start` flags announcing this node's GPUs by architecture",
                   description="Print the `ray start` flags announcing this node's GPUs, one custom resource per "
                               "architecture: eval \"ray start --head $(q4lab fleet resources)\".")


def fleet_command(args: argparse.Namespace) -> int:
    gpus, archs = node_resources()
    if not archs:
        raise FleetError("no GPU is visible to torch on this node: it has nothing to announce (it can still be "
                         "the head and the driver: `ray start --head --num-gpus 0`)")
    print(ray_start_flags(gpus, archs))
    return 0
