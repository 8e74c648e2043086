"""impl="mma", the fused dequantize + tensor-core GEMM: its refusals everywhere, its launch choice where
the library builds, and its results against the float64 reference on a GPU."""
import itertools

import pytest
import torch

from q4lab import checks, formats, kernels, ops

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available() or ops.available_impls("cuda", ("mma",))["mma"] is not None,
                               reason="needs an NVIDIA GPU of sm_80 or later (the mma kernel runs nowhere else)")


def test_mma_refuses_fp32_small_blocks_and_shapes_past_its_offsets_with_the_way_out():
    assert "simt" in ops.unsupported_reason("mma", "fp32", 64)
    assert "blocksize >= 64" in ops.unsupported_reason("mma", "bf16", 32)
    assert ops.unsupported_reason("mma", "bf16", 64) is None and ops.unsupported_reason("mma", "fp16", 4096) is None
    # the kernel's 32-bit offsets: a 256000 x 16384 lm_head fits, 2^32 weight bytes or activations do not
    assert ops.unsupported_reason("mma", "bf16", 64, (256000, 16384, 64)) is None
    assert "dequant_blas" in ops.unsupported_reason("mma", "bf16", 64, (1 << 20, 1 << 13, 1))
    assert "split the batch" in ops.unsupported_reason("mma", "bf16", 64, (4096, 1 << 15, 1 << 17))


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
def test_mma_matches_float64_with_every_grid_and_leaves_the_tickets_at_zero(dname):
    """Forced grids on odd N and M across the batch tiles, both codes and absmax forms, bias: one block
    (each warp crosses many items), a few, and the library's pick (many warps share each item's K).
    Outputs poisoned first and every launch made twice: the tickets must be back at zero for the next."""
    dtype = ops.DTYPES[dname]
    g = torch.Generator(device="cuda").manual_seed(7)
    for (N, K), qt, nested in itertools.product([(37, 192), (1003, 512), (515, 4096)], formats.QUANT_TYPES,
                                                (False, True)):
        w = formats.quantize(torch.randn(N, K, device="cuda", generator=g).to(dtype), qt, 64, nested)
        for M, blocks in ((1, 1), (7, 3), (13, 0), (31, 2), (47, 0), (67, 5)):
            A = torch.randn(M, K, device="cuda", generator=g).to(dtype)
            bias = torch.randn(N, device="cuda", generator=g).to(dtype) if M % 2 else None
            want = checks.reference(A, w) + (bias.double() if bias is not None else 0)
            for _ in range(2):
                out = torch.full((M, N), float("nan"), dtype=dtype, device="cuda")
                ops.mma_gemm(A, w, bias, blocks=blocks, out=out)
                error = checks.check_error(out, want)
                assert error <= checks.CHECK_TOLERANCE[dname], f"{qt} nested={nested} N={N} K={K} M={M}: {error:.2e}"


def test_auto_leaves_mma_for_the_defaults_past_its_offsets(monkeypatch):
    class PicksMma:
        def covers(self, arch, dtype, quant_type):
            return True

        def choose(self, N, K, M, dtype, arch, quant_type, device):
            return "mma"

    monkeypatch.setattr(ops, "dispatch_rule", PicksMma)
    monkeypatch.setattr(ops, "device_arch", lambda device: "sm_90")
    monkeypatch.setattr(ops, "device_name", lambda device: "NVIDIA H200")
    monkeypatch.setitem(ops._available, torch.device("cuda"), {"mma": None})
    assert ops.auto_impl(4096, 4096, 8, torch.bfloat16, "cuda") == "mma"
    assert ops.auto_impl(4096, 1 << 15, 1 << 17, torch.bfloat16, "cuda") == "dequant_blas"
