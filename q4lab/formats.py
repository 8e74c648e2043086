"""NF4/FP4 4-bit weights, bit-exact with bitsandbytes 0.50.2 (docs/DESIGN.md, "Conventions").

A weight `W` [N, K] is flattened row-major and cut into blocks of `blocksize` consecutive elements. Each
block is scaled by its absmax into [-1, 1], every element is rounded to the nearest of 16 code values
(NF4 or FP4), and two 4-bit code indices are packed into a byte, the even element in the HIGH nibble.
With `nested=True` (bitsandbytes' "compress_statistics", QLoRA's double quantization) the float32
absmax vector itself is quantized: its mean is subtracted (`nested_offset`) and the rest is quantized
blockwise (256 per block) to uint8 indices into the signed 8-bit dynamic map (`nested_code`), with one
float32 `nested_absmax` per 256 blocks.

Bit-exactness means: for the same input, `quantize` produces the same packed bytes, absmax, nested
absmax, offset and code tables as `bitsandbytes.functional.quantize_4bit` running on its CPU backend,
and `dequantize` the same values as its `dequantize_4bit`. The arithmetic below copies that backend
step by step (bitsandbytes/backends/default/ops.py for the 4-bit codes, the compiled
`cquantize_blockwise_cpu_fp32` for the nested absmax); the comments say where it is unusual. q4lab runs
the same torch code on every device; bitsandbytes' own CUDA kernels are a different implementation
that this module is not checked against.

`q4lab.bnb_state` reads and writes a weight in the state-dict layout of a bitsandbytes `Linear4bit`.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace

import torch

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
NESTED_BLOCKSIZE = 256  # bitsandbytes always quantizes the absmax vector in blocks of 256

# bitsandbytes.functional.get_4bit_type("nf4"): quantiles of N(0, 1), normalized to [-1, 1] (QLoRA).
NF4_CODE = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]  # fmt: skip

# bitsandbytes.functional.get_4bit_type("fp4"): 1 sign bit (bit 3), 2 exponent bits, 1 mantissa bit,
# [0, 0.0625, 8, 12, 4, 6, 2, 3, -0, -0.0625, -8, -12, -4, -6, -2, -3] / 12 in float32. Index 8 is +0.0
# there (its Python literal `-0` is an integer), so it is +0.0 here too.
FP4_CODE = [
    0.0, 0.0052083334885537624, 0.6666666865348816, 1.0,
    0.3333333432674408, 0.5, 0.1666666716337204, 0.25,
    0.0, -0.0052083334885537624, -0.6666666865348816, -1.0,
    -0.3333333432674408, -0.5, -0.1666666716337204, -0.25,
]  # fmt: skip


class FormatError(ValueError):
    """A weight, parameter or state dict that q4lab's 4-bit format cannot represent."""


def code_table(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 code values (float32) a 4-bit index stands for, in index order."""
    _check_quant_type(quant_type)
    return torch.tensor(NF4_CODE if quant_type == "nf4" else FP4_CODE, dtype=torch.float32, device=device)


def dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map, `create_dynamic_map(signed=True)`: 256 sorted float32 values.

    For each decimal exponent e = -6..0 it holds ±10**e times the midpoints of 2**(e+6) + 1 points evenly
    spaced over [0.1, 1], plus 0 and 1. Built with the same float32 torch ops as bitsandbytes, so the
    values are identical, not just close.
    """
    values = [0.0, 1.0]
    for i in range(7):
        boundaries = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        values += ((10 ** (i - 6)) * means).tolist() + (-(10 ** (i - 6)) * means).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32, device=device)


@dataclass(frozen=True)
class Q4Weight:
    """A 4-bit weight [N, K] in bitsandbytes' layout; every tensor flat and on one device.

    packed: uint8 [N*K/2], two codes a byte, even element in the high nibble.
    absmax: float32 [N*K/blocksize]; when nested, uint8 indices into `nested_code`.
    code: float32 [16], the NF4 or FP4 table.
    nested_absmax: float32 [ceil(nblocks/256)], nested_offset: float, nested_code: float32 [256];
    all three None when not nested.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    shape: tuple[int, int]
    dtype: torch.dtype
    quant_type: str
    blocksize: int
    nested_absmax: torch.Tensor | None = None
    nested_offset: float | None = None
    nested_code: torch.Tensor | None = None

    def __post_init__(self):
        _check_parameters(tuple(self.shape), self.dtype, self.quant_type, self.blocksize)
        object.__setattr__(self, "shape", tuple(int(n) for n in self.shape))
        object.__setattr__(self, "blocksize", int(self.blocksize))
        N, K = self.shape
        nblocks = N * K // self.blocksize
        _check_tensor("packed", self.packed, torch.uint8, (N * K // 2,))
        _check_tensor("code", self.code, torch.float32, (16,))
        # torch.equal returns a Python bool: one host sync per weight built, on a 16-entry table
        if not torch.equal(self.code, code_table(self.quant_type, self.code.device)):
            raise FormatError(
                f"code is not bitsandbytes' {self.quant_type} table: q4lab supports only the standard "
                "NF4/FP4 tables; requantize the weight with bitsandbytes' defaults"
            )
        nested_parts = (self.nested_absmax, self.nested_offset, self.nested_code)
        if any(part is None for part in nested_parts) and not all(part is None for part in nested_parts):
            raise FormatError(
                "nested_absmax, nested_offset and nested_code must be given together (nested) or all be "
                "None (not nested)"
            )
        if self.nested:
            _check_tensor("absmax", self.absmax, torch.uint8, (nblocks,))
            nested_blocks = math.ceil(nblocks / NESTED_BLOCKSIZE)
            _check_tensor("nested_absmax", self.nested_absmax, torch.float32, (nested_blocks,))
            _check_tensor("nested_code", self.nested_code, torch.float32, (256,))
            object.__setattr__(self, "nested_offset", float(self.nested_offset))
            if not math.isfinite(self.nested_offset):
                raise FormatError(f"nested_offset is {self.nested_offset}: it must be finite")
        else:
            _check_tensor("absmax", self.absmax, torch.float32, (nblocks,))
        tensors = (self.packed, self.absmax, self.code, self.nested_absmax, self.nested_code)
        devices = sorted({str(t.device) for t in tensors if t is not None})
        if len(devices) > 1:
            raise FormatError(f"tensors are on several devices {devices}: put them on one, e.g. with .to(device)")

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    @property
    def N(self) -> int:
        return self.shape[0]

    @property
    def K(self) -> int:
        return self.shape[1]

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def weight_bytes(self) -> int:
        """Bytes a kernel reads to use this weight: packed codes + absmax (+ the nested state)."""
        tensors = [self.packed, self.absmax]
        if self.nested:
            tensors += [self.nested_absmax, self.nested_code]
        offset_bytes = 4 if self.nested else 0  # the float32 offset
        return sum(t.numel() * t.element_size() for t in tensors) + offset_bytes

    def to(self, device: torch.device | str) -> Q4Weight:
        """The same weight with every tensor on `device`."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(
            self,
            packed=move(self.packed),
            absmax=move(self.absmax),
            code=move(self.code),
            nested_absmax=move(self.nested_absmax),
            nested_code=move(self.nested_code),
        )


def quantize(W: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64, nested: bool = False) -> Q4Weight:
    """Quantize a weight [N, K] (fp16/bf16/fp32, any device) to 4 bits, as bitsandbytes' quantize_4bit does."""
    _check_weight(W, quant_type, blocksize)
    W = W.detach()
    flat = W.reshape(-1).float()
    code = code_table(quant_type, W.device)
    codes, absmax = _quantize_4bit_codes(flat, code, blocksize)
    packed = (codes[0::2] << 4) | codes[1::2]
    if not nested:
        return Q4Weight(packed, absmax, code, tuple(W.shape), W.dtype, quant_type, blocksize)
    offset = absmax.mean()
    nested_code = dynamic_map(W.device)
    absmax_codes, nested_absmax = _quantize_8bit_codes(absmax - offset, nested_code, NESTED_BLOCKSIZE)
    return Q4Weight(
        packed, absmax_codes, code, tuple(W.shape), W.dtype, quant_type, blocksize,
        nested_absmax=nested_absmax, nested_offset=offset.item(), nested_code=nested_code,
    )  # fmt: skip


def dequantize(w: Q4Weight) -> torch.Tensor:
    """The weight [N, K] in `w.dtype` on `w.device`, as bitsandbytes' dequantize_4bit computes it."""
    values = w.code[_codes(w)].view(-1, w.blocksize) * unpack_absmax(w).view(-1, 1)  # float32, rounded once
    return values.reshape(w.shape).to(w.dtype)


def dequantize_float64(w: Q4Weight) -> torch.Tensor:
    """The exact weight [N, K], code * absmax in float64 on `w.device`: what every reference compares to
    (the kernels multiply in fp32 without rounding to the weight's dtype)."""
    values = w.code.double()[_codes(w)].view(-1, w.blocksize) * unpack_absmax(w).double().view(-1, 1)
    return values.reshape(w.shape)


def _codes(w: Q4Weight) -> torch.Tensor:
    """The 4-bit code of every element, flat, in element order (even element from the high nibble)."""
    return torch.stack([w.packed >> 4, w.packed & 0xF], dim=1).reshape(-1).long()


def unpack_absmax(w: Q4Weight) -> torch.Tensor:
    """The float32 absmax of every block; for a nested weight, dequantized from its 8-bit codes."""
    if not w.nested:
        return w.absmax
    nblocks = w.absmax.numel()
    per_block = w.nested_absmax.repeat_interleave(NESTED_BLOCKSIZE)[:nblocks]
    return w.nested_code[w.absmax.long()] * per_block + w.nested_offset


def _quantize_4bit_codes(flat: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 code index per element and float32 absmax per block (bitsandbytes' default-backend quantize_4bit)."""
    blocks = flat.view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    # Multiply by the reciprocal (not divide), and clamp absmax so an all-zero block scales to 0, not NaN.
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    # Nearest code: count the midpoints between sorted codes that lie strictly below the value, so a
    # value exactly on a midpoint goes to the lower code. FP4's table is not sorted and holds 0.0 twice
    # (indices 0 and 8): a stable sort puts index 0 first, so 0 and tiny negatives get index 0 and tiny
    # positives index 8, as in bitsandbytes.
    sorted_code, order = torch.sort(code, stable=True)
    midpoints = (sorted_code[:-1] + sorted_code[1:]) / 2
    codes = order[torch.bucketize(scaled, midpoints)]
    return codes.to(torch.uint8), absmax


def _quantize_8bit_codes(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 index into `code` per element and float32 absmax per block of a float32 vector.

    Copies bitsandbytes 0.50.2's compiled CPU kernel (cquantize_blockwise_cpu_fp32, read from its
    disassembly), which is NOT plain nearest rounding: the normalized value v is first snapped to a grid
    of 65536 points, j = trunc(fma((v + 1) * 0.5, 65535, 0.5)), and a lookup table gives the code nearest
    to grid point j. Near 0 the grid (spacing 3e-5) is coarser than the dynamic map, so e.g. 3e-7 maps to
    the code 2.1e-5, not to 0. A block whose absmax is 0 gets index 0 everywhere. The last block may be
    partial, as bitsandbytes allows for this vector.
    """
    n = x.numel()
    blocks = torch.nn.functional.pad(x, (0, -n % blocksize)).view(-1, blocksize)  # zeros leave absmax unchanged
    absmax = blocks.abs().amax(dim=1)
    inverse = 1.0 / torch.where(absmax == 0, 1.0, absmax)
    v = torch.clamp(blocks * inverse.view(-1, 1), -1, 1)
    half = (v + 1.0) * 0.5
    # (half * 65535 + 0.5) is exact in float64; rounding it once to float32 is what the fused multiply-add does.
    grid_index = (half.double() * 65535.0 + 0.5).float().trunc().long()
    codes = _dynamic_lookup_table(code).to(x.device)[grid_index]
    codes = torch.where(absmax.view(-1, 1) == 0, 0, codes)
    return codes.reshape(-1)[:n], absmax


def _dynamic_lookup_table(code: torch.Tensor) -> torch.Tensor:
    """uint8 [65536]: for grid point j, value (2j / 65535) - 1 in float32, the index of the nearest code.

    A value exactly on the midpoint of two codes goes to the lower one. Built on the CPU, where torch's
    float32 division is the correctly rounded one the compiled kernel uses.
    """
    code = code.cpu()
    midpoints = (code[:-1] + code[1:]) * 0.5
    j = torch.arange(65536, dtype=torch.float32)
    grid = (j + j) / 65535.0 - 1.0
    return torch.bucketize(grid, midpoints).to(torch.uint8)


def _check_quant_type(quant_type) -> None:
    if quant_type not in QUANT_TYPES:
        raise FormatError(f"unknown quant_type {quant_type!r}: use one of {QUANT_TYPES}")


def _is_int(n) -> bool:
    return isinstance(n, numbers.Integral) and not isinstance(n, bool)


def _check_parameters(shape: tuple[int, ...], dtype: torch.dtype, quant_type: str, blocksize: int) -> None:
    _check_quant_type(quant_type)
    if not _is_int(blocksize) or blocksize not in BLOCKSIZES:
        raise FormatError(f"unsupported blocksize {blocksize!r}: use one of {BLOCKSIZES} (an int)")
    if dtype not in DTYPES:
        raise FormatError(
            f"weight dtype {dtype} is not supported: convert it first, e.g. W.to(torch.float16); "
            f"q4lab quantizes {[dtype_name(d) for d in DTYPES]}"
        )
    if len(shape) != 2:
        raise FormatError(
            f"weight must be 2-D [N, K] (out_features x in_features), got shape {tuple(shape)}: "
            "reshape it, e.g. W.reshape(-1, W.shape[-1])"
        )
    if not all(_is_int(n) for n in shape):
        raise FormatError(f"weight shape {tuple(shape)} must be whole numbers (ints), got "
                          f"{[type(n).__name__ for n in shape]}: q4lab never rounds a shape")
    N, K = shape
    if N <= 0 or K <= 0:
        raise FormatError(f"weight shape {tuple(shape)} is empty (or negative): there is nothing to quantize")
    if K % blocksize:
        divisors = [b for b in BLOCKSIZES if K % b == 0]
        suggestion = f"(e.g. {divisors[-1]})" if divisors else f"(none of {BLOCKSIZES} divides K)"
        raise FormatError(
            f"K={K} is not a multiple of blocksize {blocksize}: pick a blocksize that divides K {suggestion} "
            "or pad the weight yourself; q4lab never pads or truncates"
        )


def _check_weight(W, quant_type: str, blocksize: int) -> None:
    if not isinstance(W, torch.Tensor):
        raise FormatError(f"weight must be a torch.Tensor, got {type(W).__name__}: wrap it with torch.as_tensor")
    _check_parameters(tuple(W.shape), W.dtype, quant_type, blocksize)
    finite = torch.isfinite(W)
    if not bool(finite.all()):
        bad = (~finite).nonzero()
        row, col = bad[0].tolist()
        raise FormatError(
            f"weight has {len(bad)} NaN/Inf value(s), the first at [{row}, {col}] ({W[row, col].item()}): "
            "fix or drop them before quantizing (a non-finite absmax would poison its whole block)"
        )


def _check_tensor(name: str, t, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    if not isinstance(t, torch.Tensor):
        raise FormatError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise FormatError(f"{name} has dtype {t.dtype}, expected {dtype}: the state does not match this format")
    if tuple(t.shape) != shape:
        raise FormatError(
            f"{name} has shape {tuple(t.shape)}, expected {shape}: the state does not match the weight's "
            "shape and blocksize (flat tensors, bitsandbytes layout)"
        )


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
