"""`q4lab sweep grid | nsweep | compact`: the command line of q4lab.sweep, and a sweep split over several
GPUs of this host (one worker process per GPU, each into its own log, compacted into one dataset) or, with
--ray, over the GPUs of a Ray cluster (q4lab.fleet, one dataset per device)."""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import torch

from q4lab import analysis, dataset, fleet, formats, kernels, launch, ops
from q4lab.runlog import SweepError, compact
from q4lab.shapes import FAMILIES, select, sized_shape
from q4lab.sweep import GRID_MS, RUNNERS, SHIPPED_IMPL_MAX_M, SHIPPED_MS, TIMED_IMPLS, grid_plan, nsweep_plan

# `sweep grid`'s defaults (--m: None, for GRID_MS), which --preset shipped refuses to see changed
GRID_DEFAULTS = {"shapes": "all", "m": None, "dtypes": "fp16,bf16,fp32", "impls": ",".join(TIMED_IMPLS),
                 "quant_types": "nf4", "repeat": False}

_WORKER = "import json, sys, q4lab.sweep as s; s.RUNNERS[sys.argv[1]](**json.loads(sys.argv[2]))"
PLANS = {"run_grid": grid_plan, "run_nsweep": nsweep_plan}   # a runner's plan alone, from its arguments
SETTINGS = ("rounds", "tol", "max_remeasure")                # a runner's arguments that are not its plan's


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
    grid.set_defaults(**GRID_DEFAULTS)
    grid.add_argument("--shapes", help=f"comma-separated shape names, families ({', '.join(FAMILIES)}) or 'all' "
                                       f"(default: %(default)s)")
    grid.add_argument("--m", type=_int_list, help=f"M values (default: {','.join(map(str, GRID_MS))})")
    grid.add_argument("--dtypes", help=f"of {', '.join(ops.DTYPES)} (default: %(default)s)")
    grid.add_argument("--impls", help=f"of {', '.join(ops.IMPLS)}, or 'all' for {', '.join(TIMED_IMPLS)} (the default)")
    grid.add_argument("--quant-types", help=f"of {', '.join(formats.QUANT_TYPES)} (default: %(default)s)")
    grid.add_argument("--repeat", action="store_true",
                      help="label the rows sweep='repeat': a re-measurement to show run-to-run spread")
    grid.add_argument("--preset", choices=("shipped",),
                      help=f"the shipped grid (data/README.md): every shape, dtype and timed impl at M "
                           f"{','.join(map(str, SHIPPED_MS))}, gemv up to M={SHIPPED_IMPL_MAX_M['gemv']}; "
                           f"about 10 minutes with --gpus all on two H200s")

    nsweep = sub.add_parser("nsweep", help="N from start to stop by step at fixed K",
                            description="Time an N sweep into a raw log, then compact it into a parquet dataset.")
    nsweep.add_argument("--k", type=int, required=True, help="K (in_features), a multiple of the blocksize")
    nsweep.add_argument("--m", type=_int_list, default="1,8", help="M values (default: %(default)s)")
    nsweep.add_argument("--n-start", type=int, default=512, help="first N (default: %(default)s)")
    nsweep.add_argument("--n-stop", type=int, default=16384, help="last N, inclusive (default: %(default)s)")
    nsweep.add_argument("--n-step", type=int, default=64, help="N step (default: %(default)s)")
    nsweep.add_argument("--dtypes", default="fp16", help=f"of {', '.join(ops.DTYPES)} (default: %(default)s)")
    nsweep.add_argument("--impls", default="simt,dense,bnb",
                        help=f"of {', '.join(ops.IMPLS)}, or 'all' (default: %(default)s)")
    nsweep.add_argument("--quant-types", "--quant-type", default="nf4", choices=formats.QUANT_TYPES,
                        dest="quant_types", help="4-bit format, one per N sweep (default: %(default)s)")

    for cmd in (grid, nsweep):
        add_run_arguments(cmd)

    comp = sub.add_parser("compact", help="raw log(s) -> parquet dataset",
                          description="Compact raw sweep logs of one device into a parquet dataset.")
    comp.add_argument("logs", nargs="+", type=Path, help="raw JSON-lines logs of sweeps on one device")
    comp.add_argument("--out", type=Path, required=True, help="parquet dataset to write")


def _writable(path: Path, option: str) -> None:
    """Refuse, before anything is measured, a path the results could not be written to."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SweepError(f"{option} {path}: cannot create its folder ({err.strerror}: {err.filename}); give a file path in a "
                         f"folder you can write to") from None
    if path.is_dir() or not os.access(path.parent, os.W_OK):
        raise SweepError(f"{option} {path}: {'that is a folder' if path.is_dir() else 'its folder is read-only'}; "
                         f"give a file path in a folder you can write to")


def add_run_arguments(cmd: argparse.ArgumentParser) -> None:
    """How every measuring command runs: weights, rounds, re-measurement, cache, output, GPUs."""
    cmd.add_argument("--blocksize", type=int, default=64, help="weights quantized per absmax block (default: %(default)s)")
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
    cmd.add_argument("--ray", metavar="ADDRESS",
                     help="measure on the GPUs of a Ray cluster ('auto': the one this machine joined), one "
                          "dataset per device: <out stem>.<host>.<arch>.parquet (README, several hosts)")
    cmd.add_argument("--arch", help="with --ray: architectures to measure on, e.g. sm_90,gfx1201, or 'all' the "
                                    "cluster announces (the default)")
    cmd.add_argument("--no-progress", action="store_true", help="no progress bar")


def sweep_command(args: argparse.Namespace) -> int:
    if args.sweep_command == "compact":
        _writable(args.out, "--out")
        frame = compact(args.logs, args.out)
        print(f"{args.out}: {frame.height} rows")
        return 0
    common = _run_options(args)
    if args.sweep_command == "grid":
        func, kwargs = "run_grid", dict(shapes=args.shapes, ms=args.m or GRID_MS, dtypes=args.dtypes,
                                        impls=args.impls, quant_types=args.quant_types,
                                        sweep="repeat" if args.repeat else "grid", **common)
        if args.preset == "shipped":
            said = vars(args) | ({"impls": GRID_DEFAULTS["impls"]} if args.impls == "all" else {})  # 'all': the default impls
            given = [f"--{k.replace('_', '-')}" for k, default in GRID_DEFAULTS.items() if said[k] != default]
            if given:
                raise SweepError(f"--preset shipped fixes the grid: leave out {', '.join(given)} (or the preset)")
            kwargs |= dict(ms=SHIPPED_MS, impl_max_m=SHIPPED_IMPL_MAX_M)
    else:
        func, kwargs = "run_nsweep", dict(K=args.k, ms=args.m, n_start=args.n_start, n_stop=args.n_stop,
                                          n_step=args.n_step, impls=args.impls, dtypes=args.dtypes,
                                          quant_type=args.quant_types, **common)
    return measure(func, kwargs, args)


def _run_options(args: argparse.Namespace) -> dict:
    return dict(blocksize=args.blocksize, nested=args.nested, rounds=args.rounds, cold=not args.warm,
                tol=args.tol, max_remeasure=args.max_remeasure, progress=not args.no_progress)


def measure(func: str, kwargs: dict, args: argparse.Namespace) -> int:
    """Run RUNNERS[func] here or over --gpus into --log, then compact the log(s) into --out."""
    _writable(args.out, "--out")
    log = args.log or args.out.with_suffix(".jsonl")
    _writable(log, "--log")
    if args.ray:
        return _measure_on_ray(func, kwargs, args, log)
    if args.arch:
        raise SweepError("--arch picks architectures of a Ray cluster: give --ray too (or leave --arch out)")
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


def _measure_on_ray(func: str, kwargs: dict, args: argparse.Namespace, log: Path) -> int:
    """--ray: the plan's chunks as Ray tasks on every asked architecture, one dataset per device."""
    if args.gpus:
        raise SweepError("--ray and --gpus exclude each other: on a Ray cluster, Ray hands out the GPUs")
    settings = {k: kwargs[k] for k in SETTINGS}
    plan = PLANS[func](**{k: v for k, v in kwargs.items() if k not in (*SETTINGS, "progress")})
    paths = fleet.run_on_ray(plan, settings, args.ray, args.arch or "all", args.out, log,
                             progress=not args.no_progress)
    print("\n".join(f"{path}: {dataset.load(path).height} rows" for path in paths))
    return 0


# ------------------------------------------------------------------------------------------ experiments

def _shape_sizes(text: str) -> list[tuple[int, int]]:
    """NxK sizes, catalogue shape names and families ('all': every shape), comma-separated, as (N, K) pairs
    without repeats."""
    what = (f"give comma-separated NxK sizes (28672x8192,4096x4096), shape names or families ({', '.join(FAMILIES)}, "
            "or all): `q4lab shapes` lists them")
    sizes = []
    for token in (t.strip() for t in text.split(",") if t.strip()):
        if token[0].isdigit():
            sizes += [tuple(int(x) if x.isdigit() else -1 for x in token.lower().split("x"))]
            continue
        try:
            sizes += [(s.N, s.K) for s in select(token)]
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"{err}; {what}") from None
    if not sizes or any(len(size) != 2 or min(size) < 0 for size in sizes):
        raise argparse.ArgumentTypeError(f"{text!r}: {what}")
    return list(dict.fromkeys(sizes))


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", type=_shape_sizes, default="28672x8192,128256x4096,8192x8192,4096x4096,1024x4096",
                        help="comma-separated NxK weight sizes, shape names or families, or 'all' the catalogue's "
                             "sizes (default: %(default)s)")
    parser.add_argument("--m", type=_int_list, default="1,8", help="M values (default: %(default)s)")
    parser.add_argument("--dtypes", default="bf16,fp16,fp32", help=f"of {', '.join(ops.DTYPES)} (default: %(default)s)")
    parser.add_argument("--impls", default="all", help=f"of {', '.join(ops.IMPLS)}, or 'all' (the default)")
    parser.add_argument("--kernels", type=lambda text: [Path(t) for t in text.split(",") if t], default=[],
                        metavar="DIR[,DIR]", help="variant copies of kernels/ to time beside it in the same rounds: "
                        f"each of {', '.join(ops.KERNEL_IMPLS)} asked for runs on each one's library too, as impl "
                        "'<impl>@<its kernel hash>'")
    add_run_arguments(parser)


def use_variants(folders: list[Path], impls) -> list[str]:
    """Point Q4LAB_VARIANTS at `folders` (copies of kernels/ with a change) and return `impls` with each
    kernel impl among them also on each folder's library ("mma@<hash>"), after the impls given."""
    shipped = kernels.source_hash()
    hashes = {}
    for folder in folders:
        if not folder.is_dir() or not any(folder.glob("*.cu")):
            raise SweepError(f"--kernels {folder}: no kernel sources (*.cu) there; give a copy of kernels/ "
                             "with the change to time")
        h = kernels.source_hash(folder)
        if h == shipped:
            raise SweepError(f"--kernels {folder}: the same sources as {kernels.KERNEL_DIR} (hash {h}, comments "
                             "aside): nothing to time beside them")
        hashes.setdefault(h, folder.resolve())
    given = list(TIMED_IMPLS if impls == "all" else [i for i in str(impls).split(",") if i])
    timed = [i for i in given if i in ops.KERNEL_IMPLS]
    if not timed:
        raise SweepError(f"--kernels times the impls that run kernels/ ({', '.join(ops.KERNEL_IMPLS)}); "
                         f"--impls {impls} names none of them")
    if torch.cuda.is_available():  # a variant that does not compile fails here, before anything is measured
        for folder in hashes.values():
            kernels.build(kernel_dir=folder)
    os.environ["Q4LAB_VARIANTS"] = os.pathsep.join(str(f) for f in hashes.values())
    for h, folder in hashes.items():
        print(f"variant {h}: {folder} (impls {', '.join(f'{i}@{h}' for i in timed)}; keep it for the record: "
              f"bash scripts/variant_patch.sh BASE {folder} \"what it changes\")")
    return [*given, *(f"{i}@{h}" for h in hashes for i in timed)]


def bench_command(args: argparse.Namespace) -> int:
    """Every impl on NxK sizes outside the shape catalogue, rows labelled sweep='bench'. `--kernels DIR`
    times a variant of kernels/ beside the shipped one, interleaved in the same rounds: its rows' impl names
    it ("mma@<hash>"), while kernel_hash stays the shipped kernels'."""
    impls = args.impls
    if args.kernels:
        if args.ray:
            raise SweepError("--kernels times variants built on this machine: leave out --ray (or --kernels)")
        impls = use_variants(args.kernels, impls)
    kwargs = dict(shapes=[sized_shape(N, K, "bench") for N, K in args.shapes], ms=args.m, dtypes=args.dtypes,
                  impls=impls, sweep="bench", **_run_options(args))
    rc = measure("run_grid", kwargs, args)
    if args.kernels:
        timed = {impl.partition("@")[2] for impl in impls} - {""}
        ratios = analysis.variant_ratios(dataset.load(args.out)).filter(pl.col("variant").is_in(timed))
        with pl.Config(tbl_rows=-1, tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True):
            print(ratios.select("variant", "impl", "dtype", "N", "K", "M", "time_us", "variant_time_us", "ratio",
                                "stable"))
    return rc


def add_configs_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=_int_list, default="512,1024,2048,3072,4096,6144,8192,16384",
                        help="N values (default: %(default)s)")
    parser.add_argument("--k", type=_int_list, default="4096,14336", help="K values (default: %(default)s)")
    parser.add_argument("--m", type=_int_list, default="1,8", help="M values (default: %(default)s)")
    parser.add_argument("--dtypes", default="bf16", help=f"of {', '.join(ops.DTYPES)} (default: %(default)s)")
    add_run_arguments(parser)


def configs_command(args: argparse.Namespace) -> int:
    """The simt kernel at every launch configuration (impl "simt/r{R}m{MT}") beside its own pick ("simt")
    over N x K x M, rows labelled sweep='configs': the data the launch model (kernels/q4_launch.h) is fitted
    to. Each configuration is checked against the reference before it is timed."""
    kwargs = dict(shapes=[sized_shape(N, K, "configs") for K in args.k for N in args.n], ms=args.m, dtypes=args.dtypes,
                  impls=["simt", *launch.CONFIG_IMPLS], sweep="configs", **_run_options(args))
    rc = measure("run_grid", kwargs, args)
    frame = pl.read_parquet(args.out).filter(pl.col("sweep") == "configs")
    best = (frame.filter(pl.col("impl") != "simt").group_by("dtype", "N", "K", "M", "nested")
            .agg(pl.col("time_us").min().alias("best_us")))
    auto = frame.filter(pl.col("impl") == "simt").join(best, on=["dtype", "N", "K", "M", "nested"])
    if auto.height:
        ratio = (auto["time_us"] / auto["best_us"]).log().mean()
        print(f"the launcher's own pick: {math.exp(ratio):.3f}x of the best configuration (geometric mean over "
              f"{auto.height} points), worst {(auto['time_us'] / auto['best_us']).max():.2f}x")
    return rc
