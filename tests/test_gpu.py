"""On a GPU: every impl against the float64 reference on awkward shapes, every blocksize, a sweep end to end,
and the kernels under compute-sanitizer. Run them on a GPU machine with `.venv/bin/python -m pytest -m gpu`;
without a GPU they are skipped (tests/conftest.py). The reference and the tolerances are the ones every
check uses (q4lab.checks)."""
import itertools
import shutil
import subprocess
import sys

import pytest
import torch

from q4lab import checks, formats, ops, runlog, sweep

pytestmark = pytest.mark.gpu

# N not a multiple of 4/8/64; K from one block (64) to 28672
SHAPES = [(1, 64), (37, 64), (1003, 512), (4099, 4096), (515, 28672)]
MS = (1, 2, 3, 4, 7, 8, 16, 33, 64)


def gpu_impls(dtype: str | None = None, blocksize: int = 64) -> list[str]:
    """The timed impls this GPU runs (and that take `dtype` and `blocksize`, when given)."""
    reasons = ops.available_impls("cuda")
    return [i for i in sweep.TIMED_IMPLS if reasons[i] is None and (dtype is None or
                                                                   ops.unsupported_reason(i, dtype, blocksize) is None)]


def check(impl: str, A: torch.Tensor, w: formats.Q4Weight, bias, want: torch.Tensor, dtype: str) -> str | None:
    """None when `impl` writes every output and matches the reference, else what went wrong."""
    out = torch.full((A.shape[0], w.N), float("nan"), dtype=A.dtype, device=A.device)  # poisoned
    ops.gemm_4bit(A, w, bias, impl, out=out)
    error = checks.check_error(out, want)  # NaN (an output never written) fails too
    return None if error <= checks.CHECK_TOLERANCE[dtype] else f"{impl}: error {error:.3g}"


@pytest.mark.parametrize("N, K", SHAPES)
def test_every_impl_matches_the_reference_and_writes_every_output(N, K):
    g = torch.Generator(device="cuda").manual_seed(N * K)
    W = torch.randn(N, K, device="cuda", generator=g)
    failures = []
    for quant_type, nested, (dtype, torch_dtype) in itertools.product(formats.QUANT_TYPES, (False, True),
                                                                      ops.DTYPES.items()):
        w = formats.quantize(W.to(torch_dtype), quant_type, 64, nested)
        for M, with_bias in itertools.product(MS, (False, True)):
            A = torch.randn(M, K, device="cuda", generator=g).to(torch_dtype)
            bias = torch.randn(N, device="cuda", generator=g).to(torch_dtype) if with_bias else None
            want = checks.reference(A, w) + (bias.double() if with_bias else 0)
            failures += [f"{quant_type} nested={nested} {dtype} M={M} bias={with_bias} {why}"
                         for impl in gpu_impls(dtype) if (why := check(impl, A, w, bias, want, dtype))]
    assert not failures, "\n".join(failures)


def test_every_blocksize_including_a_partial_last_group():
    g = torch.Generator(device="cuda").manual_seed(1)
    failures = []
    for blocksize, quant_type, nested in itertools.product(formats.BLOCKSIZES, formats.QUANT_TYPES, (False, True)):
        K = 8192 + 512 if blocksize <= 512 else 8192  # K ends in a partial 1024-weight group where it can
        w = formats.quantize(torch.randn(129, K, device="cuda", generator=g, dtype=torch.float16), quant_type,
                             blocksize, nested)
        A = torch.randn(5, K, device="cuda", generator=g, dtype=torch.float16)
        want = checks.reference(A, w)
        failures += [f"blocksize {blocksize} {quant_type} nested={nested} {why}"
                     for impl in gpu_impls("fp16", blocksize) if (why := check(impl, A, w, None, want, "fp16"))]
    assert not failures, "\n".join(failures)


def test_a_small_grid_sweeps_end_to_end_on_the_gpu(tmp_path):
    log = tmp_path / "mini.jsonl"
    sweep.run_grid(["llama-3-8b.kv_proj", "llama-3-8b.q_proj"], [1, 8, 64], ["fp16"], gpu_impls(), device="cuda",
                   log=log, progress=False)
    frame = runlog.compact(log, tmp_path / "mini.parquet")
    assert frame.height == 2 * 3 * len(gpu_impls())
    assert (frame["time_us"] > 0).all() and (frame["device_gbps"] > 0).all() and frame["timer"].unique().to_list() == ["cuda_events"]
    assert not [r for r in runlog.read_log(log) if r["kind"] == "error"]


SANITIZED = """
import itertools, torch
from q4lab import formats, ops
g = torch.Generator(device="cuda").manual_seed(1)
for (N, K), nested, dtype in itertools.product([(37, 64), (130, 1024)], (False, True), ops.DTYPES.values()):
    w = formats.quantize(torch.randn(N, K, device="cuda", generator=g).to(dtype), "nf4", 64, nested)
    for M in (1, 3, 9):
        A = torch.randn(M, K, device="cuda", generator=g).to(dtype)
        bias = torch.randn(N, device="cuda", generator=g).to(dtype)
        for impl in ("simt", "gemv", "dequant_blas") + (("mma",) if dtype != torch.float32 else ()):
            ops.gemm_4bit(A, w, bias, impl)
torch.cuda.synchronize()
"""


@pytest.mark.slow
def test_the_kernels_run_clean_under_compute_sanitizer():
    tool = shutil.which("compute-sanitizer")
    if tool is None:
        pytest.skip("compute-sanitizer is not on PATH (it ships with the CUDA toolkit: add its bin/ to PATH)")
    run = subprocess.run([tool, "--error-exitcode", "1", "--tool", "memcheck", sys.executable, "-c", SANITIZED],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "ERROR SUMMARY: 0 errors" in run.stdout
