"""Kernel checks and benchmark on a GPU, in one call (run through the `device` tool, not in CI).

    python scripts/gpu_kernels.py check      # every impl vs the float64 reference, outputs poisoned first
    python scripts/gpu_kernels.py sanitize   # a few small shapes, to run under compute-sanitizer
    python scripts/gpu_kernels.py bench      # issue-3 benchmark: all impls + torch int4 peer, interleaved rounds
    python scripts/gpu_kernels.py bench --variant v2=.exp/v2   # also time simt/gemv built from another kernels/
    python scripts/gpu_kernels.py profile    # each simt case once after a warm-up, to run under ncu
    python scripts/gpu_kernels.py configs    # every simt launch configuration (R, MT) over N, K and M (--dtype)

Results go to $OUT (or ./gpu_out) as CSV; a short table is printed last.
"""
from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from q4lab import bench, formats, kernels, launch, ops  # noqa: E402

OUT = Path(os.environ.get("OUT", "gpu_out"))
# ||out - ref|| / ||ref|| bounds. simt/gemv accumulate in fp32 from exact fp32 weights, so only the output
# rounding remains (on AMD's fp16 dot2 path the codes are rounded to fp16 first, 2^-12 relative, still
# under the fp16 bound); dense/dequant_blas/bnb first round the weight to the activation dtype (bf16: 8 bits).
TOL = {"fp32": 1e-5, "fp16": 1e-3, "bf16": 8e-3}
TOL_ROUNDED_WEIGHT = {"fp32": 1e-5, "fp16": 2e-3, "bf16": 1.2e-2}
KERNEL_IMPLS = ("simt", "gemv")


def rel_err(out: torch.Tensor, ref: tuple[torch.Tensor, torch.Tensor]) -> float:
    """||out - ref|| / || |A| @ |W|^T + |bias| ||: relative to the magnitude the sums are made of, so an
    output that cancels to near zero (N=1, K=64) does not turn rounding into a large relative error."""
    value, scale = ref
    return ((out.double() - value).norm() / scale.norm()).item()


def reference_gpu(A: torch.Tensor, w: formats.Q4Weight, bias) -> tuple[torch.Tensor, torch.Tensor]:
    """ops' float64 reference computed on the GPU (the CPU one is too slow for K=28672 x 64 rows), and the
    error scale |A| @ |W|^T + |bias|."""
    W = formats.dequantize_float64(w)
    value, scale = A.double() @ W.T, A.double().abs() @ W.abs().T
    if bias is not None:
        value, scale = value + bias.double(), scale + bias.double().abs()
    return value, scale


def check_one(impl, A, w, bias, ref) -> tuple[float, bool]:
    out = torch.full((A.shape[0], w.N), float("nan"), dtype=A.dtype, device=A.device)  # poison
    ops.gemm_4bit(A, w, bias, impl, out=out)
    torch.cuda.synchronize()
    written = not torch.isnan(out).any().item()
    return rel_err(out, ref), written


def check(args) -> int:
    torch.backends.cuda.matmul.allow_tf32 = False
    avail = ops.available_impls("cuda")
    impls = [i for i in ops.IMPLS if i != "reference" and avail[i] is None]
    print("impls:", impls, {k: v for k, v in avail.items() if v})
    # N not a multiple of 4/8/64; K from one block (64) to 28672
    shapes = [(1, 64), (37, 64), (1003, 512), (4099, 4096), (515, 28672)]
    ms = (1, 2, 3, 4, 7, 8, 16, 33, 64)
    rows, failures = [], 0
    g = torch.Generator(device="cuda").manual_seed(0)
    for (N, K), qt, nested in itertools.product(shapes, formats.QUANT_TYPES, (False, True)):
        W = torch.randn(N, K, device="cuda", generator=g, dtype=torch.float32)
        for dname, dtype in ops.DTYPES.items():
            w = formats.quantize(W.to(dtype), qt, 64, nested)
            for M, with_bias in itertools.product(ms, (False, True)):
                A = torch.randn(M, K, device="cuda", generator=g).to(dtype)
                bias = torch.randn(N, device="cuda", generator=g).to(dtype) if with_bias else None
                ref = reference_gpu(A, w, bias)
                for impl in impls:
                    err, written = check_one(impl, A, w, bias, ref)
                    tol = (TOL if impl in KERNEL_IMPLS else TOL_ROUNDED_WEIGHT)[dname]
                    ok = written and err <= tol
                    failures += not ok
                    rows.append((N, K, qt, nested, dname, M, with_bias, impl, err, written, ok))
                    if not ok:
                        print(f"FAIL {impl} N={N} K={K} {qt} nested={nested} {dname} M={M} bias={with_bias}: "
                              f"err={err:.2e} tol={tol:.0e} written={written}")
    # every blocksize, one shape; K ends in a partial 1024-weight group wherever the blocksize allows one
    for bs, qt in itertools.product(formats.BLOCKSIZES, formats.QUANT_TYPES):
        K = 8192 + 512 if bs <= 512 else 8192
        W = torch.randn(129, K, device="cuda", generator=g, dtype=torch.float16)
        for nested in (False, True):
            w = formats.quantize(W, qt, bs, nested)
            A = torch.randn(5, K, device="cuda", generator=g, dtype=torch.float16)
            ref = reference_gpu(A, w, None)
            for impl in impls:
                err, written = check_one(impl, A, w, None, ref)
                tol = (TOL if impl in KERNEL_IMPLS else TOL_ROUNDED_WEIGHT)["fp16"]
                ok = written and err <= tol
                failures += not ok
                rows.append((129, K, qt, nested, f"fp16/bs{bs}", 5, False, impl, err, written, ok))
                if not ok:
                    print(f"FAIL {impl} blocksize={bs} {qt} nested={nested}: err={err:.2e}")
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "check.csv", "w") as f:
        f.write("N,K,quant_type,nested,dtype,M,bias,impl,rel_err,written,ok\n")
        f.writelines(",".join(map(str, r)) + "\n" for r in rows)
    worst = {}
    for r in rows:
        key = (r[7], r[4].split("/")[0])
        worst[key] = max(worst.get(key, 0.0), r[8])
    print("\nworst rel err by impl/dtype:")
    for (impl, d), e in sorted(worst.items()):
        print(f"  {impl:>13} {d:>5}: {e:.2e}")
    print(f"\ncheck: {len(rows)} cases, {failures} failures")
    return 1 if failures else 0


def sanitize(args) -> int:
    g = torch.Generator(device="cuda").manual_seed(1)
    for (N, K), nested, dname in itertools.product([(37, 64), (130, 1024)], (False, True), ops.DTYPES):
        w = formats.quantize(torch.randn(N, K, device="cuda", generator=g).to(ops.DTYPES[dname]), "nf4", 64, nested)
        for M in (1, 3, 9):
            A = torch.randn(M, K, device="cuda", generator=g).to(ops.DTYPES[dname])
            bias = torch.randn(N, device="cuda", generator=g).to(ops.DTYPES[dname])
            for impl in ("simt", "gemv", "dequant_blas"):
                ops.gemm_4bit(A, w, bias, impl)
    torch.cuda.synchronize()
    print("sanitize run done")
    return 0


def variant_libraries(specs: list[str]) -> dict[str, object]:
    """NAME=DIR -> the kernel library built from DIR (another version of kernels/), for side-by-side timing."""
    libs = {}
    for spec in specs:
        name, _, folder = spec.partition("=")
        libs[name] = kernels.open_library(kernels.build((kernels.gpu_arch(),), kernel_dir=Path(folder).resolve()))
    return libs


def with_library(lib, fn):
    """fn run with the kernel library swapped for `lib` (ops looks the library up on every call)."""
    def call():
        saved = kernels.library
        kernels.library = lambda: lib
        try:
            fn()
        finally:
            kernels.library = saved
    return call


def int4_peer(N: int, K: int, group: int = 64):
    """torch's int4 weight-only kernel (what torchao's int4 uses), on random codes; bf16 activations."""
    codes = torch.randint(0, 16, (N, K), dtype=torch.int32, device="cuda")
    packed = ((codes[:, ::2] << 4) | codes[:, 1::2]).to(torch.uint8)
    Wp = torch._convert_weight_to_int4pack(packed, 8)
    sz = torch.randn(K // group, N, 2, device="cuda", dtype=torch.bfloat16) * 0.01
    return lambda A: torch._weight_int4pack_mm(A, Wp, group, sz)


def bench_cmd(args) -> int:
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.device("cuda")
    facts = bench.device_facts(dev)
    gbps, launch = bench.device_gbps(dev), bench.launch_us(dev)
    print(f"{facts['device']} {facts['arch']}  read {gbps:.0f} GB/s  launch {launch:.2f} us"
          f"  NF4/64{', nested absmax' if args.nested else ''}")
    avail = ops.available_impls(dev)
    variants = variant_libraries(args.variant)
    shapes = [(int(s.split("x")[0]), int(s.split("x")[1])) for s in args.shapes.split(",")]
    items = []  # (label, N, K, M, dtype, impl, fn, bytes)
    for N, K in shapes:
        W = torch.randn(N, K, device=dev, dtype=torch.float16)
        w = formats.quantize(W, "nf4", 64, args.nested)
        del W
        peer = int4_peer(N, K)
        for M, dname in itertools.product(args.m, args.dtypes):
            dtype = ops.DTYPES[dname]
            A = torch.randn(M, K, device=dev).to(dtype)
            ref = reference_gpu(A, w, None)
            for impl in ops.IMPLS:
                if impl == "reference" or avail[impl] is not None:
                    continue
                if impl != "simt" and dname == "fp32" and not args.all_fp32:
                    continue
                out = torch.empty(M, N, dtype=dtype, device=dev)
                fn = (lambda A=A, w=w, impl=impl, out=out: ops.gemm_4bit(A, w, None, impl, out=out))
                fn()
                tol = (TOL if impl in KERNEL_IMPLS else TOL_ROUNDED_WEIGHT)[dname]
                err = rel_err(out, ref)
                if err > tol:
                    print(f"WRONG {impl} {N}x{K} M={M} {dname}: {err:.2e}")
                items.append((f"{N}x{K}", N, K, M, dname, impl, fn, ops.impl_bytes(impl, w, M, dtype)))
            for (name, lib), impl in itertools.product(variants.items(), KERNEL_IMPLS):
                out = torch.empty(M, N, dtype=dtype, device=dev)
                fn = with_library(lib, lambda A=A, w=w, impl=impl, out=out: ops.gemm_4bit(A, w, None, impl, out=out))
                fn()
                if rel_err(out, ref) > TOL[dname]:
                    print(f"WRONG {impl}@{name} {N}x{K} M={M} {dname}")
                items.append((f"{N}x{K}", N, K, M, dname, f"{impl}@{name}", fn, ops.impl_bytes(impl, w, M, dtype)))
            if dname == "bf16":
                items.append((f"{N}x{K}", N, K, M, dname, "torch_int4", lambda A=A, f=peer: f(A),
                              ops.impl_bytes("simt", w, M, dtype)))
    rounds: dict[int, list[float]] = {i: [] for i in range(len(items))}
    for r in range(args.rounds):
        order = list(range(len(items)))
        order = order[r * len(order) // args.rounds:] + order[:r * len(order) // args.rounds]
        for i in order:
            t = bench.time_call(items[i][6], device=dev, budget_s=args.budget_s)
            rounds[i].append(t.time_us)
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    lines = ["shape,N,K,M,dtype,impl,time_us,spread,bytes,gbps,bw_frac,device_gbps,launch_us,model_us"]
    table = {}
    for i, (label, N, K, M, dname, impl, _, nbytes) in enumerate(items):
        med = statistics.median(rounds[i])
        spread = (max(rounds[i]) - min(rounds[i])) / med
        model = launch + nbytes / gbps / 1e3
        lines.append(f"{label},{N},{K},{M},{dname},{impl},{med:.2f},{spread:.3f},{nbytes},"
                     f"{nbytes / med / 1e3:.0f},{nbytes / med / 1e3 / gbps:.3f},{gbps:.0f},{launch:.2f},{model:.2f}")
        table[(label, M, dname, impl)] = (med, spread, nbytes / med / 1e3 / gbps, model)
    (OUT / "bench.csv").write_text("\n".join(lines) + "\n")
    print(f"\n{facts['device']}: read {gbps:.0f} GB/s, launch {launch:.2f} us; time_us (spread) [bw frac]")
    impls = ["simt", "gemv", "dequant_blas", "dense", "bnb", "torch_int4"]
    impls += sorted({it[5] for it in items if "@" in it[5]})
    for dname in args.dtypes:
        print(f"\n{dname:>5} {'shape':>12} {'M':>3} " + " ".join(f"{i:>18}" for i in impls) + "  model_us")
        for label, M in itertools.product(dict.fromkeys(it[0] for it in items), args.m):
            cells, model = [], ""
            for impl in impls:
                v = table.get((label, M, dname, impl))
                cells.append(f"{v[0]:8.1f} ({v[1]:.2f})[{v[2]:.2f}]" if v else " " * 18)
                model = f"{v[3]:.1f}" if v else model
            print(f"{dname:>5} {label:>12} {M:>3} " + " ".join(f"{c:>18}" for c in cells) + f"  {model}")
    return 0


def profile(args) -> int:
    """Each (shape, M, dtype) simt call twice: ncu -k regex:q4_gemm --launch-skip 1 profiles the second."""
    dev = torch.device("cuda")
    for s, M, dname in itertools.product(args.shapes.split(","), args.m, args.dtypes):
        N, K = (int(x) for x in s.split("x"))
        w = formats.quantize(torch.randn(N, K, device=dev, dtype=torch.float16), "nf4", 64, args.nested)
        A = torch.randn(M, K, device=dev).to(ops.DTYPES[dname])
        for _ in range(2):
            ops.gemm_4bit(A, w, None, "simt")
        torch.cuda.synchronize()
        print(f"profiled simt {N}x{K} M={M} {dname}")
    return 0


def configs(args) -> int:
    """Every (rows per warp R, activation rows per block MT) over a grid of N, K and M in one activation
    dtype (`--dtype`, bf16 by default): the data the launch rule (q4_simt_config) is fitted to. `auto` is
    the rule's own choice. Each configuration's output is checked against the float64 reference before it
    is timed; a wrong one fails the run. Each point is appended to $OUT/configs.csv as it is measured, so a
    run cut short keeps what it took; a point whose reference does not fit in memory is skipped, loudly.
    `Q4LAB_KERNELS=DIR` times an experiment's copy of kernels/ instead (docs/PERF.md, session 5)."""
    dev, dtype = torch.device("cuda"), ops.DTYPES[args.dtype]
    residency = ops.simt_blocks_per_sm(dtype, args.nested)  # what the launcher reads for these weights
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    print(f"{args.dtype}: resident blocks per SM (R, MT): {residency}"
          + ("" if residency == launch.SM90_BLOCKS_PER_SM[args.dtype] else
             "  (differs from launch.SM90_BLOCKS_PER_SM)"))
    OUT.mkdir(parents=True, exist_ok=True)
    wrong = 0
    with open(OUT / "configs.csv", "w") as csv:
        csv.write("dtype,N,K,M,config,time_us\n")
        for K, N in itertools.product(args.k, args.n):
            w = formats.quantize(torch.randn(N, K, device=dev, dtype=torch.float16), "nf4", 64, args.nested)
            for M in args.m:
                A = torch.randn(M, K, device=dev).to(dtype)
                try:
                    ref = reference_gpu(A, w, None)
                except torch.OutOfMemoryError:
                    print(f"N={N:>6} K={K:>6} M={M:>3}  skipped: the float64 reference does not fit", flush=True)
                    continue
                out = torch.empty(M, N, dtype=A.dtype, device=dev)
                times = {}
                for R, MT in [(0, 0), *launch.SIMT_CONFIGS]:
                    name = "auto" if R == 0 else f"r{R}m{MT}"
                    fn = (lambda R=R, MT=MT: ops.simt_gemm(A, w, rows_per_warp=R, m_tile=MT, out=out))
                    out.fill_(float("nan"))  # poison
                    fn()
                    err = rel_err(out, ref)
                    if not err <= TOL[args.dtype]:  # NaN (an unwritten output) fails too
                        wrong += 1
                        print(f"WRONG {name} N={N} K={K} M={M}: {err:.2e}", flush=True)
                    times[name] = bench.time_call(fn, device=dev, budget_s=args.budget_s).time_us
                csv.writelines(f"{args.dtype},{N},{K},{M},{c},{t:.2f}\n" for c, t in times.items())
                csv.flush()
                best = min((t, c) for c, t in times.items() if c != "auto")
                pick = "r{}m{}".format(*launch.simt_launch(N, M, K, sms, residency, args.dtype))  # auto's, mirrored
                print(f"N={N:>6} K={K:>6} M={M:>3}  best {best[1]} {best[0]:8.1f} us  "
                      f"auto ({pick}) {times['auto']:8.1f} us "
                      f"({times['auto'] / best[0]:.2f}x)", flush=True)
            del w  # freed before the next weight is quantized: the large ones take tens of GB
    return 1 if wrong else 0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=("check", "sanitize", "bench", "profile", "configs"))
    p.add_argument("--shapes", default="28672x8192,128256x4096,8192x8192,4096x4096,1024x4096")
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    p.add_argument("--m", type=ints, default=[1, 8])
    p.add_argument("--n", type=ints, default=[512, 1024, 2048, 3072, 4096, 6144, 8192, 16384], help="configs: N values")
    p.add_argument("--k", type=ints, default=[4096, 14336], help="configs: K values")
    p.add_argument("--dtypes", type=lambda s: s.split(","), default=["bf16", "fp16", "fp32"])
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="configs: activation dtype")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=0.2)
    p.add_argument("--all-fp32", action="store_true", help="time every impl in fp32, not only simt")
    p.add_argument("--nested", action="store_true",
                   help="bench/profile/configs: nested (double-quantized) absmax, as bitsandbytes' compress_statistics")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=DIR",
                   help="also time simt and gemv built from the kernel sources in DIR, as simt@NAME")
    args = p.parse_args()
    t0 = time.time()
    rc = {"check": check, "sanitize": sanitize, "bench": bench_cmd, "profile": profile,
          "configs": configs}[args.what](args)
    print(f"[{args.what}: {time.time() - t0:.0f} s]")
    return rc


if __name__ == "__main__":
    sys.exit(main())
