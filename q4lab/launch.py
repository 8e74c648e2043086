"""The fused simt kernel's launch rule and its time model, as kernels/q4_gemm.cu's q4_simt_config computes
them: which (rows per warp R, M tile MT) the launcher picks for a shape, and how much a launch's wave
quantization should slow it (`wave_slowdown`, which feeds the camping analysis' "wave_tail" label). The
model's constants live in one file, kernels/q4_launch.h, which the kernel compiles and `constants` reads.
"""
from __future__ import annotations

import functools
import math
import os
import re
from pathlib import Path

# The kernel sources (Q4LAB_KERNELS: another folder, e.g. an experiment's copy)
KERNEL_DIR = Path(os.environ.get("Q4LAB_KERNELS", Path(__file__).resolve().parent.parent / "kernels"))
LAUNCH_HEADER = "q4_launch.h"
_CONSTEXPR = re.compile(r"^constexpr\s+(?:int|double)\s+(Q4_\w+)\s*=\s*([0-9.eE+-]+)\s*;", re.M)
SIMT_CONFIGS = tuple((R, MT) for R in (4, 2, 1) for MT in (8, 4, 2, 1))  # the launcher's order: ties keep the first
# The simt kernel held at one configuration, as an impl name (q4lab configs): "simt/r{R}m{MT}" -> (R, MT)
CONFIG_IMPLS = {f"simt/r{R}m{MT}": (R, MT) for R, MT in SIMT_CONFIGS}
# Resident blocks per SM of each (rows per warp R, M tile MT) instance of v6 on sm_90, by activation dtype:
# 128 threads a block at the ptxas register counts (90 registers at R = MT = 1 up to 255; fp32's wider
# activation loads take more). The launcher asks the runtime (`ops.simt_blocks_per_sm` shows it on a GPU);
# the other archs borrow these until measured.
_SM90_16BIT = {(1, 1): 5, (1, 2): 4, (1, 4): 3, (1, 8): 2, (2, 1): 4, (2, 2): 3, (2, 4): 2, (2, 8): 2,
               (4, 1): 4, (4, 2): 2, (4, 4): 2, (4, 8): 2}
SM90_BLOCKS_PER_SM = {"fp16": _SM90_16BIT, "bf16": _SM90_16BIT,
                      "fp32": {**_SM90_16BIT, (1, 1): 4, (1, 2): 3, (1, 4): 2, (2, 2): 2}}
# arch -> SM/CU count of the full part (H100 SXM: 132 SMs; H100 PCIe has 114: pass sm_count=114).
ARCH_SM_COUNT = {
    "sm_80": 108,    # A100
    "sm_90": 132,    # H100 SXM / H200
    "gfx90a": 104,   # MI210 (MI250X: 110 CUs per GCD)
    "gfx942": 304,   # MI300X
    "gfx1100": 96,   # RX 7900 XTX
    "gfx1151": 40,   # Strix Halo
    "gfx1201": 64,   # RX 9070 XT
}


@functools.cache
def constants(kernel_dir: Path = KERNEL_DIR) -> dict[str, float]:
    """The model's constants by their C name (Q4_WARPS, Q4_ROW_NS_R1, ...), read from q4_launch.h."""
    path = Path(kernel_dir) / LAUNCH_HEADER
    if not path.is_file():
        raise FileNotFoundError(f"no {path}: the launch model reads its constants there; run from a q4lab "
                                f"checkout (pip install -e .) or set Q4LAB_KERNELS to its kernels/ folder")
    found = {name: float(value) for name, value in _CONSTEXPR.findall(path.read_text(encoding="utf-8"))}
    if not found:
        raise ValueError(f"{path} holds no `constexpr TYPE Q4_NAME = VALUE;` lines for the launch model")
    return found


def simt_block_ns(R: int, MT: int, K: int, dtype: str = "bf16") -> float:
    """One simt block's time with its warps alone on an SM (the launcher's fitted model, H100 ns)."""
    c = constants()
    row_ns = c[f"Q4_ROW_NS_R{R}"]
    act_ns = c["Q4_ACT_NS_F32"] if dtype == "fp32" else c["Q4_ACT_NS_16BIT"]
    return K / c["Q4_MODEL_GROUP"] * (R * row_ns + MT * act_ns + R * MT * c["Q4_PAIR_NS"]) + c["Q4_BLOCK_NS"]


def _crowding(resident_blocks: int) -> float:
    """How much slower each warp runs when `resident_blocks` share an SM: a few warps fill its L1 data pipe."""
    c = constants()
    return max(1.0, c["Q4_WARPS"] * resident_blocks / c["Q4_L1_WARPS"])


def simt_blocks(N: int, M: int, R: int, MT: int) -> int:
    """Thread blocks of one (R, MT) simt launch for an [M, K] x [N, K]^T product."""
    return math.ceil(N / (int(constants()["Q4_WARPS"]) * R)) * math.ceil(M / MT)


def _busiest_sm_blocks(N: int, M: int, R: int, MT: int, sm_count: int, blocks_per_sm: int) -> float:
    """The busiest SM's share of the grid, ceil(blocks / SMs), run in waves of `blocks_per_sm` blocks: its
    time in units of one block alone on an SM."""
    waves, rest = divmod(math.ceil(simt_blocks(N, M, R, MT) / sm_count), blocks_per_sm)
    return waves * _crowding(blocks_per_sm) + (_crowding(rest) if rest else 0.0)


def simt_model_ns(N: int, M: int, K: int, R: int, MT: int, sm_count: int, blocks_per_sm: int,
                  dtype: str = "bf16") -> float:
    """Modelled time of one (R, MT) launch (`_busiest_sm_blocks` blocks of `simt_block_ns` each)."""
    return simt_block_ns(R, MT, K, dtype) * _busiest_sm_blocks(N, M, R, MT, sm_count, blocks_per_sm)


def simt_launch(N: int, M: int, K: int, sm_count: int = 132,
                blocks_per_sm: dict[tuple[int, int], int] | None = None, dtype: str = "bf16") -> tuple[int, int]:
    """(rows per warp R, activation rows per block MT) the simt launcher picks for `dtype` activations: the
    least modelled time, with MT at most M rounded up to a power of two. `blocks_per_sm` defaults to
    sm_90's residency for that dtype."""
    residency = blocks_per_sm or SM90_BLOCKS_PER_SM[dtype]
    mt_max = 1 if M <= 1 else 2 if M <= 2 else 4 if M <= 4 else 8
    configs = [c for c in SIMT_CONFIGS if c[1] <= mt_max]
    return min(configs, key=lambda c: simt_model_ns(N, M, K, *c, sm_count, residency[c], dtype))  # first of equals


def arch_geometry(arch: str, sm_count: int | None = None, blocks_per_sm: int | None = None, dtype: str = "bf16"):
    """(SM count, resident blocks per SM of each (R, MT)) for `arch` and `dtype` activations, explicit values
    winning (one `blocks_per_sm` for every configuration); None when the SM count is unknown."""
    sms = sm_count or ARCH_SM_COUNT.get(arch)
    if not sms:
        return None
    return sms, ({c: blocks_per_sm for c in SIMT_CONFIGS} if blocks_per_sm else SM90_BLOCKS_PER_SM[dtype])


def wave_slowdown(N: int, M: int, K: int, arch: str, sm_count: int | None = None,
                  blocks_per_sm: int | None = None, dtype: str = "bf16") -> float | None:
    """How much longer than an evenly spread grid the SIMT kernel should take from its launch geometry
    alone (1.0: none): the launcher's modelled time of its own choice over the same work divided across
    every SM at full residency. None when the arch's SM count is unknown and not given."""
    geometry = arch_geometry(arch, sm_count, blocks_per_sm, dtype)
    if geometry is None:
        return None
    sms, residency = geometry
    R, MT = simt_launch(N, M, K, sms, residency, dtype)
    resident = residency[(R, MT)]
    even = simt_blocks(N, M, R, MT) / (sms * resident) * _crowding(resident)  # the same unit: a block's time
    return _busiest_sm_blocks(N, M, R, MT, sms, resident) / even
