"""The torch int4 peer, `impl="torch_int4"`: torch's own int4 GEMM (`torch._weight_int4pack_mm`, the kernel
gpt-fast and torchao run) on the weight re-quantized to its format: uniform 4-bit codes with a scale and a
zero per group of `w.blocksize` weights along K, w = (code - 8) * scale + zero, scale and zero in bf16.

A timing peer, never dispatched to: the same 4-bit bytes as the NF4 weight plus 4 a group, but another
weight's product, so its output is checked against the float64 product of its own dequantized weight
(`reference`), not the NF4 one. bf16 activations, NVIDIA sm_80+, N a multiple of 8 and K of 128 (torch's
packing: 8 inner K tiles of 16), groups of 32 to 256.
"""
from __future__ import annotations

import torch

from q4lab import formats
from q4lab.formats import Q4Weight

INNER_K_TILES = 8                 # torch's packing of K: 8 tiles of 16 codes
GROUPS = (32, 64, 128, 256)       # the group sizes the kernel takes


def unsupported_reason(dtype: str, blocksize: int, shape: tuple[int, int, int] | None = None) -> str | None:
    """Why torch's int4 kernel cannot take this activation dtype, group (the weight's blocksize) or
    (N, K, M), or None."""
    if dtype != "bf16":
        return (f"impl 'torch_int4' (torch._weight_int4pack_mm) takes bf16 activations, not {dtype}: "
                f"A.to(torch.bfloat16), or another impl")
    if blocksize not in GROUPS:
        return (f"impl 'torch_int4' quantizes per group of the weight's blocksize, one of "
                f"{', '.join(map(str, GROUPS))}; this weight has {blocksize}")
    if shape is not None and (shape[0] % 8 or shape[1] % (16 * INNER_K_TILES)):
        return (f"impl 'torch_int4' needs N a multiple of 8 and K of {16 * INNER_K_TILES} (torch's int4 "
                f"packing); this weight is N={shape[0]}, K={shape[1]}")
    return None


def requantize(W: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W [N, K] as torch's int4 format, by torch's own recipe: codes [N, K / 2] (uint8, the even element in
    the high nibble) and scales_and_zeros [K / group, N, 2] (bf16), per group of `group` along K."""
    N, K = W.shape
    g = W.float().reshape(N, K // group, group)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = (hi - lo).clamp(min=1e-6) / 15
    codes = ((g - lo) / scale).round().clamp(0, 15).to(torch.uint8).reshape(N, K)
    scales_and_zeros = torch.cat([scale, lo + 8 * scale], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return (codes[:, ::2] << 4) | codes[:, 1::2], scales_and_zeros


def dequantized(codes: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """The float64 weight [N, K] the int4 format holds: (code - 8) * scale + zero, the bf16 scale and zero
    as the kernel reads them."""
    q = torch.stack([codes >> 4, codes & 15], -1).flatten(1).double()
    group = q.shape[1] // scales_and_zeros.shape[0]
    scale, zero = (scales_and_zeros[..., i].t().double().repeat_interleave(group, 1) for i in (0, 1))
    return (q - 8) * scale + zero


def state(w: Q4Weight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the kernel's packed weight, codes, scales_and_zeros) of w re-quantized: made once per weight by
    the caller's cache."""
    codes, scales_and_zeros = requantize(formats.dequantize(w), w.blocksize)
    return torch._convert_weight_to_int4pack(codes, INNER_K_TILES), codes, scales_and_zeros


def matmul(A2: torch.Tensor, w: Q4Weight, peer_state) -> torch.Tensor:
    packed, _, scales_and_zeros = peer_state
    return torch._weight_int4pack_mm(A2, packed, w.blocksize, scales_and_zeros)


def reference(A: torch.Tensor, w: Q4Weight, peer_state) -> torch.Tensor:
    """The float64 product the peer computes: A against its own dequantized weight."""
    _, codes, scales_and_zeros = peer_state
    return A.double() @ dequantized(codes, scales_and_zeros).to(A.device).T


def weight_bytes(w: Q4Weight) -> int:
    """The codes and a bf16 scale and zero a group."""
    return w.N * w.K // 2 + w.N * (w.K // w.blocksize) * 2 * 2


def unavailable_reason(device: torch.device) -> str | None:
    if device.type != "cuda" or torch.version.hip:
        return "torch's int4 kernel runs on NVIDIA GPUs only; this device is " + (
            "a ROCm GPU" if device.type == "cuda" else device.type)
    if torch.cuda.get_device_capability(device)[0] < 8:
        return "torch's int4 kernel needs an NVIDIA GPU of sm_80 or later"
    if not hasattr(torch, "_weight_int4pack_mm"):
        return f"torch {torch.__version__} has no _weight_int4pack_mm"
    return None
