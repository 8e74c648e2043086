"""gemm_4bit on the CPU: the reference is the float64 product of the exact dequantized weight, the CPU
impls agree with it, bad calls name the problem; the GPU impls are checked by tests/test_gpu.py."""
from __future__ import annotations

import pytest
import torch

import q4lab
from q4lab import formats, kernels, ops


@pytest.fixture(params=[("nf4", 64, False), ("fp4", 128, True)], ids=["nf4-64", "fp4-128-nested"])
def weight(request):
    quant_type, blocksize, nested = request.param
    torch.manual_seed(0)
    return q4lab.quantize(torch.randn(37, 256, dtype=torch.float16), quant_type, blocksize, nested)


def test_reference_is_the_float64_product_of_code_times_absmax(weight):
    A = torch.randn(3, 256, dtype=torch.float32)
    bias = torch.randn(37, dtype=torch.float32)
    codes = torch.stack([weight.packed >> 4, weight.packed & 0xF], dim=1).reshape(-1).long()
    absmax = formats.unpack_absmax(weight).double().repeat_interleave(weight.blocksize)
    W = (weight.code.double()[codes] * absmax).view(37, 256)
    expected = (A.double() @ W.T + bias.double()).float()
    assert torch.equal(q4lab.gemm_4bit(A, weight, bias, impl="reference"), expected)


# dense and dequant_blas multiply by the dequantized weight rounded to the weight's own dtype (fp16 here,
# 2^-11 relative), bf16 activations round it again (2^-8): the bounds are those roundings, not slack.
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 5e-4), (torch.float16, 2e-3), (torch.bfloat16, 1.5e-2)])
@pytest.mark.parametrize("impl", ["dense", "dequant_blas", "bnb", "auto"])
def test_cpu_impls_match_the_reference(weight, impl, dtype, tol):
    if impl == "bnb":
        pytest.importorskip("bitsandbytes")
    A = torch.randn(2, 5, 256).to(dtype)
    bias = torch.randn(37).to(dtype)
    ref = q4lab.gemm_4bit(A, weight, bias, impl="reference")
    out = q4lab.gemm_4bit(A, weight, bias, impl=impl)
    assert out.shape == (2, 5, 37) and out.dtype == dtype
    err = (out.double() - ref.double()).norm() / ref.double().norm()
    assert err <= tol, f"{impl} {dtype}: {err:.2e}"


def test_out_is_written_in_place(weight):
    A = torch.randn(4, 256)
    out = torch.full((4, 37), float("nan"))
    assert q4lab.gemm_4bit(A, weight, impl="dense", out=out) is out
    assert not out.isnan().any()
    ref = q4lab.gemm_4bit(A, weight, impl="reference")
    assert (out - ref).norm() / ref.norm() < 5e-4


def _overlapping_calls():
    """(what out overlaps, A, weight, bias, out) for out laid over each kind of input; N = K = 256 so that
    out=A has the right shape."""
    torch.manual_seed(0)
    w = q4lab.quantize(torch.randn(256, 256), "nf4", 64)
    A = torch.randn(256, 256)
    shared = torch.randn(3 * 256 * 128)  # A and out: rows 0-255 and 128-383 of one buffer
    wide = q4lab.quantize(torch.randn(256, 16384), "nf4", 64)  # its absmax: 65536 floats, out's size
    with_bias = torch.randn(256 * 256 + 256)
    return [
        ("A", A, w, None, A),
        ("A", shared[:65536].view(256, 256), w, None, shared[32768:].view(256, 256)),
        ("the weight's absmax", torch.randn(256, 16384), wide, None, wide.absmax.view(256, 256)),
        ("bias", A, w, with_bias[-256:], with_bias[256:].view(256, 256)),
    ]


@pytest.mark.parametrize("impl", ["reference", "dense", "dequant_blas"])
def test_out_that_shares_memory_with_an_input_is_refused(impl):
    for name, A, w, bias, out in _overlapping_calls():
        before = out.clone()
        with pytest.raises(ValueError, match=f"out shares memory with {name}: .*separate out tensor"):
            q4lab.gemm_4bit(A, w, bias, impl=impl, out=out)
        assert torch.equal(out, before)  # refused before anything was written
    A = torch.randn(512, 256)
    w = q4lab.quantize(torch.randn(256, 256), "nf4", 64)
    q4lab.gemm_4bit(A[:256], w, impl=impl, out=A[256:])  # adjacent, not overlapping: allowed
    assert torch.allclose(A[256:], q4lab.gemm_4bit(A[:256], w, impl="reference"), rtol=1e-3, atol=1e-3)


def test_impl_bytes_counts_the_weight_each_impl_reads(weight):
    M, elem = 8, 2
    moved = M * 256 * elem + M * 37 * elem
    assert ops.impl_bytes("simt", weight, M, torch.float16) == weight.weight_bytes + moved
    assert ops.impl_bytes("dense", weight, M, torch.float16, bias=True) == 37 * 256 * elem + moved + 37 * elem


def test_available_impls_on_the_cpu_say_why_not():
    avail = ops.available_impls("cpu")
    assert set(avail) == set(ops.IMPLS)
    assert avail["dense"] is None and avail["dequant_blas"] is None and avail["reference"] is None
    assert "GPU" in avail["simt"] and "GPU" in avail["gemv"]
    assert ops.available_impls("cpu", ("dense", "simt")) == {"dense": None, "simt": avail["simt"]}


@pytest.mark.parametrize("call,message", [
    (lambda w: q4lab.gemm_4bit(torch.randn(2, 128), w), "last dimension must be K=256"),
    (lambda w: q4lab.gemm_4bit(torch.randn(2, 256, dtype=torch.float64), w), "use float16, bfloat16 or float32"),
    (lambda w: q4lab.gemm_4bit(torch.randn(2, 256), w, torch.randn(36)), r"bias must be \[37\]"),
    (lambda w: q4lab.gemm_4bit(torch.randn(2, 256), w, impl="fast"), "unknown impl 'fast'"),
    (lambda w: q4lab.gemm_4bit(torch.randn(2, 256), w, impl="dense", out=torch.empty(2, 36)), "out must be"),
    (lambda w: ops.simt_gemm(torch.randn(2, 256), w, rows_per_warp=3), "rows_per_warp must be 1, 2 or 4"),
    (lambda w: q4lab.gemm_4bit(torch.randn(2, 256).numpy(), w), r"A is a ndarray, not a torch.Tensor: .*as_tensor"),
    (lambda w: q4lab.gemm_4bit(torch.randn(2, 256), w, [0.0] * 37), "bias is a list, not a torch.Tensor"),
    (lambda w: q4lab.gemm_4bit(torch.randn(2, 256), torch.randn(37, 256)),
     r"the weight is a Tensor, not a Q4Weight: quantize it first \(w = q4lab.quantize\(W\)\)"),
])
def test_bad_calls_name_the_problem(weight, call, message):
    with pytest.raises(ValueError, match=message):
        call(weight)


@pytest.mark.parametrize("impl, call", [("mma", ops.mma_gemm), ("simt", ops.simt_gemm)])
def test_the_hand_launched_kernels_refuse_cpu_tensors_as_gemm_4bit_does(weight, impl, call):
    A = torch.randn(2, 256, dtype=torch.bfloat16)
    with pytest.raises(kernels.KernelError) as by_hand:
        call(A, weight)
    with pytest.raises(kernels.KernelError) as through_gemm_4bit:
        q4lab.gemm_4bit(A, weight, impl=impl)
    assert str(by_hand.value) == str(through_gemm_4bit.value) == (
        f"impl '{impl}' is unavailable: needs a GPU (CUDA or ROCm torch); this device is cpu")


def test_dense_weight_is_cached_per_weight_and_dtype(weight):
    first = ops.dense_weight(weight, torch.float16)
    assert ops.dense_weight(weight, torch.float16) is first
    assert ops.dense_weight(weight, torch.float32).dtype == torch.float32
