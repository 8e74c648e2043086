"""impl="mma", the fused dequantize + tensor-core GEMM: its refusals everywhere, its launch choice where
the library builds, and its results against the float64 reference on a GPU."""
import itertools

import pytest
import torch

from q4lab import formats, kernels, ops

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available() or ops.available_impls("cuda")["mma"] is not None,
                               reason="needs an NVIDIA GPU of sm_80 or later (the mma kernel runs nowhere else)")


def test_mma_refuses_fp32_and_small_blocks_with_the_way_out():
    assert "simt" in ops.mma_unsupported_reason("fp32", 64)
    assert "blocksize >= 64" in ops.mma_unsupported_reason("bf16", 32)
    assert ops.mma_unsupported_reason("bf16", 64) is None and ops.mma_unsupported_reason("fp16", 4096) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_mma_on_cpu_says_it_needs_a_gpu():
    w = formats.quantize(torch.randn(16, 64), "nf4", 64)
    assert ops.available_impls("cpu")["mma"] is not None
    with pytest.raises(kernels.KernelError, match="impl 'mma' is unavailable"):
        ops.gemm_4bit(torch.randn(2, 64, dtype=torch.bfloat16), w.to("cpu"), impl="mma")
    with pytest.raises(kernels.KernelError, match="fp32 runs on 'simt'"):
        ops.gemm_4bit(torch.randn(2, 64), w, impl="mma")


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dname", ["fp16", "bf16"])
def test_mma_matches_float64_on_odd_shapes(dname):
    """N off every tile size, K one block up, M across the batch tiles (primes included), both codes, both
    absmax forms, bias, forced K splits; outputs poisoned first and every launch made twice (the split's
    tickets must be left at zero for the next one)."""
    dtype = ops.DTYPES[dname]
    g = torch.Generator(device="cuda").manual_seed(7)
    tolerance = {"fp16": 2e-3, "bf16": 1.2e-2}[dname]  # the codes are rounded to the activation dtype
    for (N, K), qt, nested in itertools.product([(1, 64), (37, 192), (1003, 512), (515, 4096)], formats.QUANT_TYPES,
                                                (False, True)):
        w = formats.quantize(torch.randn(N, K, device="cuda", generator=g).to(dtype), qt, 64, nested)
        W = formats.dequantize_float64(w)
        for M, split in ((1, 0), (2, 0), (7, 0), (13, 2), (31, 0), (47, 3), (64, 0), (67, 1)):
            A = torch.randn(M, K, device="cuda", generator=g).to(dtype)
            bias = torch.randn(N, device="cuda", generator=g).to(dtype) if M % 2 else None
            want = A.double() @ W.T + (bias.double() if bias is not None else 0)
            scale = (A.double().abs() @ W.abs().T).norm()
            for _ in range(2):
                out = torch.full((M, N), float("nan"), dtype=dtype, device="cuda")
                ops.mma_gemm(A, w, bias, split=min(split, K // 64), out=out)
                assert not out.isnan().any(), f"unwritten outputs: N={N} K={K} M={M}"
                err = ((out.double() - want).norm() / scale).item()
                assert err <= tolerance, f"{qt} nested={nested} N={N} K={K} M={M} split={split}: {err:.2e}"
