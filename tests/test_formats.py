"""q4lab.formats: bit-exact with bitsandbytes' CPU backend, its Linear4bit state dicts, error bounds, bad input."""
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from q4lab import bnb_state, formats
from q4lab.formats import FormatError, Q4Weight, dequantize, quantize

try:
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
except ImportError:  # CI always has it; without it only the comparisons against bitsandbytes are skipped
    bnb = F = None
needs_bnb = pytest.mark.skipif(bnb is None, reason="bitsandbytes is not installed")

PREFIX = "model.layers.0.mlp.up_proj."
TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def make_weight(shape, dtype, blocksize, seed=0):
    """Random weight with the cases rounding gets wrong: an all-zero block, exact zeros, tiny values
    (FP4's two zeros), a value exactly on a code, and a wide spread of block scales."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(shape, generator=gen) * torch.logspace(-3, 1, shape[0]).view(-1, 1)
    W[0, :blocksize] = 0.0
    W[1, :7] = 0.0
    W[1, 7:11] = torch.tensor([1e-9, -1e-9, 3e-4, -3e-4]) * W[1].abs().max()
    W[2, 0], W[2, 1] = 1.0, 0.5626170039176941  # an NF4 code times absmax 1
    return W.to(dtype)


def bnb_quantize(W, quant_type, blocksize, nested):
    return F.quantize_4bit(W, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type)


def assert_same_as_bnb(w: Q4Weight, packed, state):
    assert torch.equal(w.packed, packed.reshape(-1))
    assert torch.equal(w.absmax, state.absmax) and w.absmax.dtype == state.absmax.dtype
    assert torch.equal(w.code, state.code)
    assert w.nested == state.nested
    if state.nested:
        assert torch.equal(w.nested_absmax, state.state2.absmax)
        assert w.nested_offset == state.offset.item()
        assert torch.equal(w.nested_code, state.state2.code)


@needs_bnb
def test_code_tables_are_bitsandbytes_tables():
    for quant_type in formats.QUANT_TYPES:
        ours, theirs = formats.code_table(quant_type), F.get_4bit_type(quant_type, device="cpu")
        assert torch.equal(ours, theirs)
        assert torch.equal(torch.signbit(ours), torch.signbit(theirs))  # FP4's +0.0 at index 8 too
    assert torch.equal(formats.dynamic_map(), F.create_dynamic_map(signed=True))


# Blocksizes 2048/4096 send bitsandbytes' CPU dequantize through a torch.compile'd fallback on AVX512
# machines (a second or two to compile each); one shape keeps that to a few compiles, and 2048 is left out
# because it takes the same path as 4096.
@needs_bnb
@pytest.mark.parametrize("dtype", TORCH_DTYPES)
@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
@pytest.mark.parametrize("quant_type", formats.QUANT_TYPES)
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 512, 1024, 4096])
def test_quantize_and_dequantize_match_bitsandbytes(blocksize, quant_type, nested, dtype):
    shapes = [(33, 4096), (64, 8192)] if blocksize < 2048 else [(33, 4096)]
    for seed, shape in enumerate(shapes):
        W = make_weight(shape, TORCH_DTYPES[dtype], blocksize, seed)
        packed, state = bnb_quantize(W, quant_type, blocksize, nested)
        w = quantize(W, quant_type, blocksize, nested)
        assert_same_as_bnb(w, packed, state)
        ours, theirs = dequantize(w), F.dequantize_4bit(packed, state)
        assert ours.dtype == theirs.dtype == W.dtype and ours.shape == W.shape
        assert torch.equal(ours, theirs)


@needs_bnb
@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
def test_all_zero_weight_matches_bitsandbytes_without_nan(nested):
    W = torch.zeros(8, 256, dtype=torch.float16)
    packed, state = bnb_quantize(W, "nf4", 64, nested)
    w = quantize(W, "nf4", 64, nested)
    assert_same_as_bnb(w, packed, state)
    out = dequantize(w)
    assert torch.equal(out, F.dequantize_4bit(packed, state))
    assert not out.isnan().any() and torch.equal(out, W)


@needs_bnb
def test_nested_absmax_quantizer_matches_bitsandbytes_kernel():
    """The 8-bit kernel snaps values to a 65536-point grid: hit every grid point, the float32 values
    around every half-way point between two grid points (where its fused multiply-add decides), and
    wide random spreads."""
    code = formats.dynamic_map()
    j = torch.arange(65536, dtype=torch.float32)
    grid = (j + j) / 65535.0 - 1.0
    half_way = ((2 * j[:-1].double() + 1) / 65535 - 1).float()
    around_half_way = [half_way]
    for _ in range(3):
        around_half_way = [torch.nextafter(around_half_way[0], torch.tensor(-2.0))] + around_half_way
        around_half_way += [torch.nextafter(around_half_way[-1], torch.tensor(2.0))]
    around_half_way = torch.cat(around_half_way + [torch.tensor([-1.0, 1.0])])  # absmax exactly 1
    cases = [(grid, 65536), (around_half_way, around_half_way.numel())]
    gen = torch.Generator().manual_seed(0)
    for scale_exponent in range(-6, 3):
        x = torch.randn(256 * 40 + 77, generator=gen) * 10.0**scale_exponent  # a partial last block too
        cases.append((x - x.mean(), 256))
    x = torch.randn(1024, generator=gen)
    x[256:512] = 0.0  # an all-zero block
    cases.append((x, 256))
    for x, blocksize in cases:
        theirs, their_absmax = torch.ops.bitsandbytes.quantize_blockwise.default(x, code.clone(), blocksize)
        ours, our_absmax = formats._quantize_8bit_codes(x, code, blocksize)
        assert torch.equal(ours, theirs) and torch.equal(our_absmax, their_absmax)


def test_even_element_goes_in_the_high_nibble():
    W = torch.tensor([[1.0, -1.0] * 32])  # NF4 index 15, then index 0
    w = quantize(W, "nf4", 64)
    assert w.packed.tolist() == [0xF0] * 32
    assert torch.equal(dequantize(w), W)


def bnb_linear4bit(W, quant_type, blocksize, nested, quant_storage=torch.uint8):
    """A bitsandbytes Linear4bit holding W, quantized the way bitsandbytes does on .to(device)."""
    N, K = W.shape
    layer = bnb.nn.Linear4bit(K, N, bias=True, compress_statistics=nested, quant_type=quant_type,
                              quant_storage=quant_storage, device="meta")  # fmt: skip
    layer.weight = bnb.nn.Params4bit(W, requires_grad=False, blocksize=blocksize, compress_statistics=nested,
                                     quant_type=quant_type, quant_storage=quant_storage, module=layer)  # fmt: skip
    layer.bias = torch.nn.Parameter(torch.zeros(N, dtype=W.dtype))
    return layer.to("cpu")


@needs_bnb
@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
@pytest.mark.parametrize("quant_type", formats.QUANT_TYPES)
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_bitsandbytes_linear4bit_state_dict_round_trip(dtype, quant_type, nested):
    W = make_weight((96, 512), TORCH_DTYPES[dtype], 128)
    layer = bnb_linear4bit(W, quant_type, 128, nested)
    model = torch.nn.Module()
    model.up_proj = layer
    sd = model.state_dict(prefix="model.layers.0.mlp.")
    expected = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state)

    loaded = bnb_state.from_state_dict(sd, prefix=PREFIX)
    assert (loaded.shape, loaded.dtype, loaded.quant_type, loaded.blocksize, loaded.nested) == (
        (96, 512), W.dtype, quant_type, 128, nested)  # fmt: skip
    assert torch.equal(dequantize(loaded), expected)

    # q4lab's own quantization writes the same entries, in the same order, byte for byte (the bias aside).
    ours = bnb_state.to_state_dict(quantize(W, quant_type, 128, nested), prefix=PREFIX)
    assert list(ours) == [key for key in sd if key != f"{PREFIX}bias"]
    for key, value in ours.items():
        assert value.dtype == sd[key].dtype and torch.equal(value, sd[key]), key

    # ...and bitsandbytes loads them back and dequantizes identically.
    stats = {k.removeprefix(f"{PREFIX}weight."): v for k, v in ours.items() if k.startswith(f"{PREFIX}weight.")}
    param = bnb.nn.Params4bit.from_prequantized(ours[f"{PREFIX}weight"], stats, device="cpu")
    assert torch.equal(F.dequantize_4bit(param.data, param.quant_state), expected)


@needs_bnb
def test_state_dict_with_non_uint8_quant_storage_loads():
    W = make_weight((32, 256), torch.bfloat16, 64)
    layer = bnb_linear4bit(W, "nf4", 64, True, quant_storage=torch.bfloat16)
    sd = layer.state_dict(prefix="lin.")
    assert sd["lin.weight"].dtype == torch.bfloat16
    w = bnb_state.from_state_dict(sd, prefix="lin.")
    assert torch.equal(dequantize(w), F.dequantize_4bit(layer.weight.data, layer.weight.quant_state))


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
def test_save_load_round_trip(tmp_path, nested):
    w = quantize(make_weight((48, 256), torch.float16, 64), "fp4", 64, nested)
    bnb_state.save(w, tmp_path / "w.pt", prefix=PREFIX)
    back = bnb_state.load(tmp_path / "w.pt", prefix=PREFIX)
    assert torch.equal(dequantize(back), dequantize(w))
    assert back.nested_offset == w.nested_offset and back.shape == w.shape


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
def test_q4weight_properties(nested):
    N, K, blocksize = 24, 512, 64
    w = quantize(make_weight((N, K), torch.bfloat16, blocksize), "nf4", blocksize, nested)
    nblocks = N * K // blocksize
    assert (w.N, w.K, w.device, w.dtype) == (N, K, torch.device("cpu"), torch.bfloat16)
    assert w.packed.shape == (N * K // 2,) and w.packed.dtype == torch.uint8
    state_bytes = nblocks + 4 * math.ceil(nblocks / 256) + 256 * 4 + 4 if nested else 4 * nblocks
    assert w.weight_bytes == N * K // 2 + state_bytes


@pytest.mark.gpu
@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
@pytest.mark.parametrize("quant_type", formats.QUANT_TYPES)
def test_gpu_quantize_and_dequantize_equal_cpu(quant_type, nested):
    """Same bytes on the GPU; only the nested offset (a mean, reduced in another order) may differ in
    its last bits, and with it the nested absmax codes."""
    W = make_weight((256, 4096), torch.float16, 64)
    on_cpu = quantize(W, quant_type, 64, nested)
    on_gpu = quantize(W.cuda(), quant_type, 64, nested)
    assert on_gpu.device.type == "cuda"
    assert torch.equal(on_gpu.packed.cpu(), on_cpu.packed)
    assert torch.equal(dequantize(on_cpu.to("cuda")).cpu(), dequantize(on_cpu))
    if nested:
        assert on_gpu.nested_offset == pytest.approx(on_cpu.nested_offset, rel=1e-6)
        torch.testing.assert_close(dequantize(on_gpu).cpu(), dequantize(on_cpu))
    else:
        assert torch.equal(on_gpu.absmax.cpu(), on_cpu.absmax)
        assert torch.equal(dequantize(on_gpu).cpu(), dequantize(on_cpu))


# --- properties ---------------------------------------------------------------------------------------

ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24}  # unit roundoff


def rounding_error(dtype, magnitude):
    """Largest error of rounding a float32 of at most `magnitude` to `dtype`, subnormals included."""
    return magnitude * ROUNDOFF[dtype] + torch.finfo(dtype).smallest_normal * ROUNDOFF[dtype]


def largest_gap(code: torch.Tensor) -> float:
    return torch.sort(code).values.diff().max().item()


weights = st.builds(
    dict,
    quant_type=st.sampled_from(formats.QUANT_TYPES),
    blocksize=st.sampled_from([32, 64, 128]),
    dtype=st.sampled_from(list(TORCH_DTYPES.values())),
    N=st.integers(1, 9),
    blocks_per_row=st.integers(1, 3),
    log_scale=st.floats(-6, 4),
    seed=st.integers(0, 2**31 - 1),
)


def random_weight(p):
    gen = torch.Generator().manual_seed(p["seed"])
    W = torch.randn(p["N"], p["blocks_per_row"] * p["blocksize"], generator=gen) * 10.0 ** p["log_scale"]
    return W.to(p["dtype"])


@settings(max_examples=60, deadline=None)
@given(weights)
def test_dequantize_error_is_within_half_the_largest_code_gap(p):
    """Each element is rounded to the nearest code of its block, so |W - dq| <= absmax * gap / 2, plus the
    final rounding to W's dtype (|dq| <= absmax; fp16 subnormals too) and a few float32 ulps of the scaling."""
    W = random_weight(p)
    w = quantize(W, p["quant_type"], p["blocksize"])
    blocks = W.float().reshape(-1, p["blocksize"])
    error = (blocks - dequantize(w).float().reshape(-1, p["blocksize"])).abs().amax(dim=1)
    absmax = blocks.abs().amax(dim=1)
    assert torch.equal(w.absmax, absmax)
    bound = absmax * (largest_gap(w.code) / 2 + 1e-6) + rounding_error(W.dtype, absmax)
    assert (error <= bound).all()


@settings(max_examples=40, deadline=None)
@given(weights)
def test_nested_absmax_error_is_bounded(p):
    """The nested absmax is rounded within its 256-block the same way against the dynamic map: error
    <= nested_absmax * (gap / 2 + one grid step of 2/65535); the weight error grows by at most that."""
    W = random_weight(p)
    flat, nested = quantize(W, p["quant_type"], p["blocksize"]), quantize(W, p["quant_type"], p["blocksize"], True)
    absmax = flat.absmax
    per_block = nested.nested_absmax.repeat_interleave(formats.NESTED_BLOCKSIZE)[: absmax.numel()]
    absmax_error = (formats.unpack_absmax(nested) - absmax).abs()
    absmax_bound = per_block * (largest_gap(nested.nested_code) / 2 + 2 / 65535) + 1e-6 * absmax
    assert (absmax_error <= absmax_bound).all()
    blocks = W.float().reshape(-1, p["blocksize"])
    error = (blocks - dequantize(nested).float().reshape(-1, p["blocksize"])).abs().amax(dim=1)
    bound = absmax * (largest_gap(nested.code) / 2 + 1e-6) + absmax_bound + rounding_error(W.dtype, 2 * absmax)
    assert (error <= bound).all()


@settings(max_examples=60, deadline=None)
@given(
    quant_type=st.sampled_from(formats.QUANT_TYPES),
    blocksize=st.sampled_from([32, 64]),
    N=st.integers(1, 6),
    max_scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**31 - 1),
)
def test_values_on_the_code_table_round_trip_exactly(quant_type, blocksize, N, max_scale, seed):
    """W = code[index] * absmax (float32), each block holding a ±1 code so its absmax is that scale:
    the indices come back (FP4's second zero, index 8, as index 0) and dequantize returns W exactly."""
    gen = torch.Generator().manual_seed(seed)
    code = formats.code_table(quant_type)
    index = torch.randint(0, 16, (N * 2, blocksize), generator=gen)
    index[:, 0] = 15 if quant_type == "nf4" else 3  # code 1.0
    scale = torch.rand(N * 2, 1, generator=gen) * max_scale + 1e-3
    W = (code[index] * scale).reshape(N, 2 * blocksize)
    w = quantize(W, quant_type, blocksize)
    assert torch.equal(dequantize(w), W)
    expected = torch.where(index == 8, 0, index) if quant_type == "fp4" else index
    unpacked = torch.stack([w.packed >> 4, w.packed & 0xF], dim=1).reshape(index.shape)
    assert torch.equal(unpacked.long(), expected)


# --- bad input ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "W, kwargs, message",
    [
        (torch.randn(8, 4100), {}, r"K=4100 is not a multiple of blocksize 64: pick a blocksize that divides K"),
        (torch.randn(8, 96), {"blocksize": 64}, r"e\.g\. 32\)"),
        (torch.randn(8, 256), {"quant_type": "int4"}, r"unknown quant_type 'int4': use one of \('nf4', 'fp4'\)"),
        (torch.randn(8, 256), {"blocksize": 48}, r"unsupported blocksize 48: use one of"),
        (torch.randn(8, 256), {"blocksize": 64.0}, r"unsupported blocksize 64.0: use one of .* \(an int\)"),
        (torch.randn(256), {}, r"must be 2-D \[N, K\].*got shape \(256,\): reshape"),
        (torch.randn(2, 8, 256), {}, r"must be 2-D \[N, K\].*got shape \(2, 8, 256\)"),
        (torch.randint(-8, 8, (8, 256), dtype=torch.int8), {}, r"dtype torch.int8 is not supported: convert"),
        (torch.randn(8, 256, dtype=torch.float64), {}, r"dtype torch.float64 is not supported"),
        (torch.zeros(0, 256), {}, r"is empty"),
    ],
)
def test_bad_weights_raise_value_error(W, kwargs, message):
    with pytest.raises(ValueError, match=message):
        quantize(W, **kwargs)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_raise_value_error(bad):
    W = torch.randn(8, 256, dtype=torch.float16)
    W[3, 17] = bad
    with pytest.raises(FormatError, match=r"1 NaN/Inf value\(s\), the first at \[3, 17\].*fix or drop them"):
        quantize(W)


def test_a_weight_with_a_fractional_shape_is_refused_not_rounded():
    w = quantize(torch.randn(96, 128))
    with pytest.raises(FormatError, match=r"weight shape \(96.5, 128\) must be whole numbers.*never rounds"):
        Q4Weight(w.packed, w.absmax, w.code, (96.5, 128), w.dtype, w.quant_type, w.blocksize)
    with pytest.raises(FormatError, match=r"unsupported blocksize 64.0"):
        Q4Weight(w.packed, w.absmax, w.code, w.shape, w.dtype, w.quant_type, 64.0)


def test_non_tensor_weight_raises_value_error():
    with pytest.raises(ValueError, match="must be a torch.Tensor, got list"):
        quantize([[1.0] * 64])


@pytest.fixture
def nested_state_dict():
    return bnb_state.to_state_dict(quantize(make_weight((16, 256), torch.float16, 64), "nf4", 64, nested=True), PREFIX)


@pytest.mark.parametrize("key", ["weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                                 "weight.nested_quant_map"])  # fmt: skip
def test_state_dict_missing_key_raises_value_error(nested_state_dict, key):
    del nested_state_dict[PREFIX + key]
    with pytest.raises(FormatError, match=rf"missing \['{PREFIX}{key}'\].*pass the full state dict"):
        bnb_state.from_state_dict(nested_state_dict, PREFIX)


def test_state_dict_without_quant_state_raises_value_error(nested_state_dict):
    del nested_state_dict[f"{PREFIX}weight.quant_state.bitsandbytes__nf4"]
    with pytest.raises(FormatError, match="no 4-bit quant state"):
        bnb_state.from_state_dict(nested_state_dict, PREFIX)


def test_state_dict_with_wrong_prefix_names_the_prefixes_it_has(nested_state_dict):
    with pytest.raises(FormatError, match=r"it has \['model\.layers\.0\.mlp\.up_proj\.weight\.quant_state.*prefix"):
        bnb_state.from_state_dict(nested_state_dict, "model.layers.1.mlp.up_proj.")


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("weight.absmax", lambda t: t.float(), r"absmax has dtype torch.float32, expected torch.uint8"),
        ("weight.nested_absmax", lambda t: t.half(), r"nested_absmax has dtype torch.float16, expected torch.float32"),
        ("weight", lambda t: t[:-1], r"packed has shape \(2047,\), expected \(2048,\)"),
        ("weight.quant_map", lambda t: formats.code_table("fp4"), r"code is not bitsandbytes' nf4 table"),
    ],
)
def test_state_dict_with_wrong_tensors_raises_value_error(nested_state_dict, key, value, message):
    nested_state_dict[PREFIX + key] = value(nested_state_dict[PREFIX + key])
    with pytest.raises(FormatError, match=message):
        bnb_state.from_state_dict(nested_state_dict, PREFIX)


QUANT_STATE = f"{PREFIX}weight.quant_state.bitsandbytes__nf4"
NESTED_ABSMAX = f"{PREFIX}weight.nested_absmax"


def _with_quant_state(sd: dict, **changes) -> dict:
    state = json.loads(bytes(sd[QUANT_STATE].tolist())) | changes
    return sd | {QUANT_STATE: torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)}


@pytest.mark.parametrize("change, message", [
    (lambda sd: sd | {NESTED_ABSMAX: sd[NESTED_ABSMAX].clone().fill_(float("nan"))},
     r"weight.nested_absmax has 1 NaN, infinite or negative value\(s\), the first at \[0\] \(nan\)"),
    (lambda sd: sd | {NESTED_ABSMAX: -sd[NESTED_ABSMAX]},
     r"nested_absmax has 1 NaN, infinite or negative value\(s\).*re-export it"),
    (lambda sd: _with_quant_state(sd, shape=[16.5, 256]),
     r"prefix 'model.layers.0.mlp.up_proj.'.*weight shape \(16.5, 256\) must be whole numbers"),
    (lambda sd: _with_quant_state(sd, blocksize=64.0), r"quant_state.bitsandbytes__nf4\): unsupported blocksize 64.0"),
    (lambda sd: _with_quant_state(sd, nested_offset="0.1"), r"nested_offset '0.1' is not a number"),
    (lambda sd: _with_quant_state(sd, dtype=["float16"]), r"weight dtype \['float16'\] is not supported"),
    (lambda sd: sd | {QUANT_STATE: sd[QUANT_STATE][:-5]},
     r"bitsandbytes__nf4 does not hold JSON text \(JSONDecodeError.*truncated or damaged"),
    (lambda sd: sd | {QUANT_STATE: torch.tensor([0xFF, 0xFE, 0x7B], dtype=torch.uint8)},
     r"bitsandbytes__nf4 does not hold JSON text \(UnicodeDecodeError"),
    (lambda sd: sd | {QUANT_STATE: torch.tensor(list(b"[1, 2]"), dtype=torch.uint8)},
     r"bitsandbytes__nf4 holds a JSON list, not the quant state's object"),
    (lambda sd: sd | {QUANT_STATE: torch.zeros(3)}, r"bitsandbytes__nf4 is not a 1-D uint8 tensor of JSON bytes"),
])
def test_a_damaged_state_dict_is_refused_naming_what_is_wrong(nested_state_dict, change, message):
    with pytest.raises(FormatError, match=message):
        bnb_state.from_state_dict(change(nested_state_dict), PREFIX)


def test_negative_absmax_of_a_plain_state_dict_is_refused():
    sd = bnb_state.to_state_dict(quantize(make_weight((16, 256), torch.float16, 64)), PREFIX)
    sd[f"{PREFIX}weight.absmax"] = sd[f"{PREFIX}weight.absmax"].clone()
    sd[f"{PREFIX}weight.absmax"][[3, 9]] = torch.tensor([-1.0, float("inf")])
    with pytest.raises(FormatError, match=r"weight.absmax has 2 NaN, infinite or negative value\(s\), the first "
                                          r"at \[3\] \(-1.0\)"):
        bnb_state.from_state_dict(sd, PREFIX)
