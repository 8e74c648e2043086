"""impl="torch_int4": torch's int4 GEMM as a timing peer, on the weight re-quantized to its format and
checked against that weight's own float64 product."""
import polars as pl
import pytest
import torch

from q4lab import checks, dispatch, formats, int4_peer, kernels, ops, synthetic

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available() or ops.available_impls("cuda", ("torch_int4",))["torch_int4"],
                               reason="needs an NVIDIA GPU of sm_80 or later and torch's int4 kernel")


def test_requantize_is_torchs_recipe_within_half_a_step_of_the_weight():
    W = torch.randn(8, 256, generator=torch.Generator().manual_seed(0))
    codes, scales_and_zeros = int4_peer.requantize(W, 64)
    assert codes.shape == (8, 128) and codes.dtype == torch.uint8
    assert scales_and_zeros.shape == (256 // 64, 8, 2) and scales_and_zeros.dtype == torch.bfloat16
    back = int4_peer.dequantized(codes, scales_and_zeros)
    step, zero = (scales_and_zeros[..., i].t().double().repeat_interleave(64, 1) for i in (0, 1))
    # half a step of rounding, plus the bf16 rounding of the scale (a code is at most 8 steps from the zero,
    # 9 with the scale's own error) and of the zero
    assert ((back - W.double()).abs() <= 0.5 * step + 2 ** -8 * (9 * step + zero.abs())).all()
    # torch's codes, the even element in the high nibble, as its packing expects
    g = W.reshape(8, 4, 64)
    lo = g.amin(-1, keepdim=True)
    q = ((g - lo) / ((g.amax(-1, keepdim=True) - lo) / 15)).round().to(torch.uint8).reshape(8, 256)
    assert torch.equal(codes, (q[:, ::2] << 4) | q[:, 1::2])


def test_the_peer_refuses_what_torchs_kernel_cannot_take_with_the_way_out():
    assert "bf16" in ops.unsupported_reason("torch_int4", "fp16", 64)
    assert "blocksize" in ops.unsupported_reason("torch_int4", "bf16", 16)
    assert "multiple of 8" in ops.unsupported_reason("torch_int4", "bf16", 64, (100, 256, 1))
    assert ops.unsupported_reason("torch_int4", "bf16", 64, (4096, 4096, 8)) is None
    assert "NVIDIA" in ops.available_impls("cpu", ("torch_int4",))["torch_int4"]
    w = formats.quantize(torch.randn(16, 128), "nf4", 64)
    with pytest.raises(kernels.KernelError, match="impl 'torch_int4' is unavailable"):
        ops.gemm_4bit(torch.randn(2, 128, dtype=torch.bfloat16), w, impl="torch_int4")


def test_the_peer_bytes_are_its_codes_and_a_bf16_scale_and_zero_a_group():
    w = formats.quantize(torch.randn(64, 512), "nf4", 128)
    assert ops.impl_bytes("torch_int4", w, 1, torch.bfloat16) - ops.impl_bytes("dense", w, 1, torch.bfloat16) == \
        64 * 512 // 2 + 64 * (512 // 128) * 4 - 64 * 512 * 2


def test_checked_rows_give_the_peer_its_own_product(monkeypatch):
    w = formats.quantize(torch.randn(16, 256), "nf4", 64)
    codes, scales_and_zeros = int4_peer.requantize(formats.dequantize(w), 64)
    monkeypatch.setattr(ops, "int4_state", lambda weight: (None, codes, scales_and_zeros))
    A = torch.randn(5, 256, dtype=torch.bfloat16)
    rows = checks.CheckedRows((5,), ("bf16",), {(256, "bf16"): A}, {"s": w})
    want = A.double() @ int4_peer.dequantized(codes, scales_and_zeros).T
    assert torch.equal(rows.get("s", 256, "bf16", "torch_int4"), want[rows.rows])
    assert torch.equal(rows.get("s", 256, "bf16"), checks.reference(A[rows.rows], w))


@needs_gpu
@pytest.mark.gpu
def test_the_peer_matches_its_own_float64_product_on_a_gpu():
    g = torch.Generator(device="cuda").manual_seed(3)
    w = formats.quantize(torch.randn(1032, 4096, device="cuda", generator=g).to(torch.bfloat16), "nf4", 64)
    for M in (1, 7, 64):
        A = torch.randn(M, 4096, device="cuda", generator=g).to(torch.bfloat16)
        out = ops.gemm_4bit(A, w, impl="torch_int4")
        want = int4_peer.reference(A, w, ops.int4_state(w))
        assert checks.check_error(out, want) <= checks.CHECK_TOLERANCE["bf16"]


def test_a_grid_with_the_peer_never_dispatches_to_it():
    # the peer multiplies by another weight: made the fastest at every point, it is still no candidate
    frame = synthetic.synthetic_dataset(nsweep=None)
    peer = frame.filter(pl.col("impl") == "simt").with_columns(pl.lit("torch_int4").alias("impl"),
                                                               pl.col("time_us") / 10)
    _, candidates = dispatch.point_times(pl.concat([frame, peer]))
    assert "torch_int4" not in candidates and "simt" in candidates
