"""`gemm_4bit(A, w, bias, impl)`: out[M, N] = A[M, K] @ dequant(W)[N, K]^T + bias, by one of several impls.

| impl         | what runs                                                   | where        |
|--------------|-------------------------------------------------------------|--------------|
| simt         | fused dequantize+GEMM kernel (kernels/q4_gemm.cu)           | GPU          |
| mma          | fused dequantize + tensor-core GEMM (kernels/q4_mma.cu): fp16/bf16, blocksize >= 64 | NVIDIA sm_80+ |
| gemv         | the classic one-warp-per-output baseline, row by row        | GPU          |
| dequant_blas | dequantize kernel to a dense weight, then torch.matmul      | GPU (CPU: torch dequantize) |
| dense        | the unquantized weight through BLAS                         | GPU, CPU     |
| bnb          | bitsandbytes' matmul_4bit on the same packed weight         | where bitsandbytes runs |
| torch_int4   | torch's _weight_int4pack_mm on the weight re-quantized to its int4 format (q4lab.int4_peer): a peer, bf16 | NVIDIA sm_80+ |
| reference    | float64 on the CPU                                          | CPU          |
| auto         | what the dispatch rule picks for (N, K, M, dtype, arch, device) | GPU (CPU: dequant_blas) |

`auto` follows a rule fitted to measured data (`q4lab.dispatch`): the one shipped in
q4lab/dispatch_rule.json (it names the datasets and kernel version it was fitted on), or the file
Q4LAB_DISPATCH names. A GPU model the rule was fitted on (by its name, "NVIDIA H200") gets its own trees,
any other its arch's. On an arch the rule does not cover, and where it picks an impl this device cannot
run (a tensor-core impl on AMD, say), auto uses the defaults: simt up to AUTO_SIMT_MAX_M[dtype] rows on a
GPU, dequant_blas above and on a CPU.
"""
from __future__ import annotations

import ctypes
import functools
import os
import platform
import weakref
from pathlib import Path

import torch

from q4lab import dispatch, formats, int4_peer, kernels
from q4lab.formats import Q4Weight

# Literals: q4lab.dataset reads both names from this source to check datasets without importing torch
IMPLS = ("simt", "mma", "gemv", "dequant_blas", "dense", "bnb", "torch_int4", "reference")
KERNEL_IMPLS = ("simt", "mma", "gemv", "dequant_blas")  # those that run kernels/: a variant's too ("mma@<hash>")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_DTYPE_CODE = {DTYPES[name]: code for name, code in kernels.DTYPE_CODES.items()}
_DTYPE_NAME = {dtype: name for name, dtype in DTYPES.items()}
_KERNEL_IMPL = {"simt": 0, "gemv": 1}

# impl="auto" where the dispatch rule has nothing for the arch: simt for M <= AUTO_SIMT_MAX_M[activation
# dtype] rows, dequant_blas above: the thresholds analysis.crossover_summary fits to AUTO_DATASET (H100,
# NF4/64; median crossovers 14.0, 13.2 and 49.3 rows).
AUTO_DATASET = "data/h100_mgrid.parquet"
AUTO_SIMT_MAX_M = {"fp16": 12, "bf16": 12, "fp32": 48}
_rules: dict[str, dispatch.Rule] = {}  # rule file -> rule, read once per process
_available: dict[torch.device, dict[str, str | None]] = {}  # available_impls per device, each impl asked once

# Per-weight caches (dense copies, bitsandbytes' QuantState), keyed by the packed tensor's id and dropped
# when that tensor is freed (tensors compare elementwise, so they cannot be dict keys themselves).
_weight_cache: dict[int, dict] = {}


def _cache_of(w: Q4Weight) -> dict:
    key = id(w.packed)
    if key not in _weight_cache:
        _weight_cache[key] = {}
        weakref.finalize(w.packed, _weight_cache.pop, key, None)
    return _weight_cache[key]


def dense_weight(w: Q4Weight, dtype: torch.dtype) -> torch.Tensor:
    """The dequantized weight [N, K] in `dtype` on w's device, made once per weight and dtype."""
    per_weight = _cache_of(w)
    if dtype not in per_weight:
        per_weight[dtype] = formats.dequantize(w).to(dtype)
    return per_weight[dtype]


def int4_state(w: Q4Weight):
    """The torch_int4 peer's re-quantized weight (q4lab.int4_peer.state), made once per weight."""
    per_weight = _cache_of(w)
    if "torch_int4" not in per_weight:
        per_weight["torch_int4"] = int4_peer.state(w)
    return per_weight["torch_int4"]


def impl_bytes(impl: str, w: Q4Weight, M: int, dtype: torch.dtype, bias: bool = False) -> int:
    """Fewest bytes the impl must move: its weight (4-bit + absmax state, or dense), A, out and bias."""
    elem = torch.empty((), dtype=dtype).element_size()
    weight = {"dense": w.N * w.K * elem, "torch_int4": int4_peer.weight_bytes(w)}.get(impl, w.weight_bytes)
    return weight + M * w.K * elem + M * w.N * elem + (w.N * elem if bias else 0)


def _bnb_unavailable_reason(device: torch.device) -> str | None:
    try:
        import bitsandbytes  # noqa: F401
    except Exception as err:  # ImportError, or a broken native library
        return f"bitsandbytes is not importable ({type(err).__name__}: {err}); pip install bitsandbytes"
    return None


def _kernel_unavailable_reason(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "needs a GPU (CUDA or ROCm torch); this device is " + device.type
    try:
        kernels.library()
    except kernels.KernelError as err:
        return str(err)
    return None


def _mma_support_reason() -> str | None:
    """Why the loaded library's mma kernel cannot run on the current GPU, or None."""
    if kernels.library().q4_mma_supported():
        return None
    return ("needs an NVIDIA GPU of sm_80 or later; its AMD form (WMMA/MFMA) is not written, and an AMD path "
            "that has never run on a card is not offered")


def unsupported_reason(impl: str, dtype: str, blocksize: int, shape: tuple[int, int, int] | None = None) -> str | None:
    """Why `impl` cannot take this activation dtype / blocksize (and, given, this (N, K, M)) on any device,
    or None."""
    if impl == "torch_int4":
        return int4_peer.unsupported_reason(dtype, blocksize, shape)
    if impl != "mma":
        return None
    if dtype == "fp32":
        return "impl 'mma' takes fp16/bf16 activations (the tensor cores' operands); fp32 runs on 'simt'"
    if blocksize < 64:
        return (f"impl 'mma' needs blocksize >= 64 (one absmax block a 64-weight tile), this weight has "
                f"{blocksize}: use 'simt'")
    if shape is not None and (shape[0] * shape[1] // 2 >= 1 << 32 or shape[2] * shape[1] >= 1 << 32):
        N, K, M = shape
        return (f"impl 'mma' addresses with 32-bit offsets, and N*K/2 = {N * K // 2} weight bytes or M*K = "
                f"{M * K} activations reach 2^32: split the batch, or use 'dequant_blas'")
    return None


def available_impls(device: torch.device | str = "cpu", impls: tuple[str, ...] = IMPLS) -> dict[str, str | None]:
    """impl -> None when it runs on `device`, else why not, for each of `impls`. Only "bnb" imports
    bitsandbytes (seconds): leave it out when it is not wanted."""
    device = torch.device(device)
    kernel_reason = _kernel_unavailable_reason(device)
    reasons = {
        "simt": kernel_reason,
        "mma": kernel_reason or _mma_support_reason(),
        "gemv": kernel_reason,
        "dequant_blas": kernel_reason if device.type == "cuda" else None,
        "dense": None,
        "reference": None,
        "torch_int4": int4_peer.unavailable_reason(device),
    }
    return {impl: _bnb_unavailable_reason(device) if impl == "bnb" else reasons[impl] for impl in impls}


def dispatch_rule() -> dispatch.Rule:
    """The rule impl="auto" follows: the file Q4LAB_DISPATCH names, else q4lab/dispatch_rule.json."""
    path = os.environ.get("Q4LAB_DISPATCH") or str(dispatch.SHIPPED)
    if path not in _rules:
        _rules[path] = dispatch.load_rule(path)
    return _rules[path]


def device_arch(device: torch.device) -> str:
    """The arch a dataset row of `device` carries: sm_90, gfx1100, or the CPU's machine name."""
    return (kernels.gpu_arch(device.index) or "") if device.type == "cuda" else platform.machine()


def device_name(device: torch.device) -> str:
    """The GPU model a dataset row of `device` carries ("NVIDIA H200"); on the CPU, any (dispatch.ANY)."""
    return torch.cuda.get_device_properties(device).name if device.type == "cuda" else dispatch.ANY


def auto_impl(N: int, K: int, M: int, dtype: torch.dtype, device: torch.device | str,
              quant_type: str = "nf4", blocksize: int = 64) -> str:
    """The impl gemm_4bit(impl="auto") runs for an [M, K] x [N, K]^T product on `device` (module doc); an
    impl the rule picks that cannot take this dtype or blocksize (`unsupported_reason`) gets the defaults."""
    device = torch.device(device)
    name = _DTYPE_NAME[dtype]
    default = "simt" if device.type == "cuda" and M <= AUTO_SIMT_MAX_M[name] else "dequant_blas"
    rule, arch = dispatch_rule(), device_arch(device)
    if not rule.covers(arch, name, quant_type):
        return default
    impl = rule.choose(N, K, M, name, arch, quant_type, device_name(device))
    usable = (impl in IMPLS and _unavailable_reason(impl, device) is None
              and unsupported_reason(impl, name, blocksize, (N, K, M)) is None)
    return impl if usable else default


def _unavailable_reason(impl: str, device: torch.device) -> str | None:
    """available_impls' answer for one impl on `device`, asked once a process: its probes (the library,
    the mma kernel's residency, bitsandbytes' import) cost microseconds to seconds, too much a call."""
    known = _available.setdefault(device, {})
    if impl not in known:
        known.update(available_impls(device, (impl,)))
    return known[impl]


def _check_runs(impl: str, A2: torch.Tensor, w: Q4Weight) -> None:
    """Refuse, saying why, an impl that cannot take this weight and [M, K] batch (`unsupported_reason`) or
    cannot run on A2's device (`available_impls`), before any launch could fail inside torch or the library."""
    reason = (unsupported_reason(impl, _DTYPE_NAME[A2.dtype], w.blocksize, (w.N, w.K, A2.shape[0]))
              or _unavailable_reason(impl, A2.device))
    if reason:
        raise kernels.KernelError(f"impl {impl!r} is unavailable: {reason}")


def _check(A: torch.Tensor, w: Q4Weight, bias: torch.Tensor | None, impl: str) -> None:
    if impl not in IMPLS and impl != "auto":
        raise ValueError(f"unknown impl {impl!r}: choose one of {', '.join(IMPLS)} or 'auto'")
    if not isinstance(w, Q4Weight):
        raise ValueError(f"the weight is a {type(w).__name__}, not a Q4Weight: quantize it first "
                         f"(w = q4lab.quantize(W)); gemm_4bit multiplies by 4-bit weights only")
    for name, t in (("A", A), ("bias", bias)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} is a {type(t).__name__}, not a torch.Tensor: convert it with "
                             f"torch.as_tensor({name}) (and .to(torch.float16) if it is float64)")
    if A.dtype not in _DTYPE_CODE:
        raise ValueError(f"activations are {A.dtype}: use float16, bfloat16 or float32 (A.to(torch.float16))")
    if A.dim() < 1 or A.shape[-1] != w.K:
        raise ValueError(f"A has shape {tuple(A.shape)} but the weight is [N={w.N}, K={w.K}]: A's last "
                         f"dimension must be K={w.K}")
    if bias is not None and (bias.shape != (w.N,) or bias.dtype != A.dtype):
        raise ValueError(f"bias must be [{w.N}] in {A.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    if impl != "reference" and A.device != w.device:
        raise ValueError(f"A is on {A.device} but the weight is on {w.device}: move one with .to()")


def _memory_span(t: torch.Tensor) -> tuple[int, int]:
    """[first, last) byte address a tensor's elements occupy (strides in torch are never negative)."""
    extent = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) + 1
    return t.data_ptr(), t.data_ptr() + extent * t.element_size()


def _check_out(out: torch.Tensor, A2: torch.Tensor, w: Q4Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """Refuse an `out` that shares memory with an input: the impls read their inputs while they write out,
    so the result would silently be wrong."""
    M = A2.shape[0]
    if out.shape != (M, w.N) or out.dtype != A2.dtype or out.device != A2.device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous [{M}, {w.N}] {A2.dtype} tensor on {A2.device}, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    inputs = {"A": A2, "bias": bias, "the weight's packed codes": w.packed, "the weight's absmax": w.absmax,
              "the weight's code table": w.code, "the weight's nested absmax": w.nested_absmax,
              "the weight's nested code table": w.nested_code}
    out_lo, out_hi = _memory_span(out)
    for name, t in inputs.items():
        if t is not None and t.numel() and out.numel() and t.device == out.device:
            lo, hi = _memory_span(t)
            if lo < out_hi and out_lo < hi:
                raise ValueError(f"out shares memory with {name}: the result would overwrite its own input; "
                                 f"pass a separate out tensor (or none)")
    return out


def _reference(A2: torch.Tensor, w: Q4Weight, bias: torch.Tensor | None) -> torch.Tensor:
    out = A2.cpu().double() @ formats.dequantize_float64(w.to("cpu")).T
    if bias is not None:
        out += bias.cpu().double()
    return out.to(A2.dtype).to(A2.device)


def _kernel(impl: str, A2: torch.Tensor, w: Q4Weight, bias: torch.Tensor | None, out: torch.Tensor,
            rows_per_warp: int = 0, m_tile: int = 0) -> torch.Tensor:
    lib = kernels.library()
    A2 = A2.contiguous()
    nested = w.nested
    kernels.check(lib.q4_gemm(
        _KERNEL_IMPL[impl], _DTYPE_CODE[A2.dtype], int(nested), A2.data_ptr(), w.packed.data_ptr(),
        w.absmax.data_ptr(), w.nested_absmax.data_ptr() if nested else None,
        w.nested_code.data_ptr() if nested else None, w.nested_offset if nested else 0.0, w.code.data_ptr(),
        bias.contiguous().data_ptr() if bias is not None else None, out.data_ptr(),
        A2.shape[0], w.N, w.K, w.blocksize, rows_per_warp, m_tile, torch.cuda.current_stream(A2.device).cuda_stream))
    return out


def simt_gemm(A: torch.Tensor, w: Q4Weight, bias: torch.Tensor | None = None, *, rows_per_warp: int = 0,
              m_tile: int = 0, out: torch.Tensor | None = None) -> torch.Tensor:
    """The simt kernel with its launch configuration chosen by hand: `rows_per_warp` R in {1, 2, 4}
    (weight rows a warp reuses each activation load for) and `m_tile` MT in {1, 2, 4, 8} (activation rows
    a block reuses each decoded weight for); 0 lets the launch model gemm_4bit(impl="simt") uses pick that
    part, given the other (`q4lab.launch.simt_launch` mirrors it when both are 0)."""
    if rows_per_warp not in (0, 1, 2, 4) or m_tile not in (0, 1, 2, 4, 8):
        raise ValueError(f"rows_per_warp must be 1, 2 or 4 and m_tile 1, 2, 4 or 8 (0 = automatic); got "
                         f"{rows_per_warp}, {m_tile}")
    _check(A, w, bias, "simt")
    A2 = A.reshape(-1, w.K)
    _check_runs("simt", A2, w)
    out = _check_out(out, A2, w, bias) if out is not None else torch.empty(A2.shape[0], w.N, dtype=A.dtype,
                                                                           device=A.device)
    return _kernel("simt", A2, w, bias, out, rows_per_warp, m_tile).reshape(*A.shape[:-1], w.N)


def simt_blocks_per_sm(dtype: torch.dtype, nested: bool = False) -> dict[tuple[int, int], int]:
    """Resident blocks per SM of each simt (rows per warp, M tile) instance on the current GPU, as the
    launcher reads them from the runtime (compare `q4lab.launch.SM90_BLOCKS_PER_SM[dtype name]`)."""
    table = (ctypes.c_int * len(kernels.SIMT_TABLE_ORDER))()
    kernels.check(kernels.library().q4_simt_blocks_per_sm(_DTYPE_CODE[dtype], int(nested), table))
    return dict(zip(kernels.SIMT_TABLE_ORDER, table))


# Scratch of the mma kernel per (device, stream): the fp32 partial sums of items whose K several warps share,
# and the per-item tickets, which every launch leaves at zero. One per stream, so launches on different
# streams never share tickets.
_mma_scratch: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}


def mma_config(w: Q4Weight, M: int, dtype: torch.dtype, blocks: int = 0) -> tuple[int, int]:
    """The mma launch the library picks for this weight and batch on the current GPU: (blocks, batch rows an
    item); `blocks` > 0 is kept."""
    return _mma_launch(w, M, dtype, blocks)[:2]


def _mma_launch(w: Q4Weight, M: int, dtype: torch.dtype, blocks: int) -> tuple[int, int, int, int]:
    """(blocks, batch rows an item, workspace floats, tickets) of the mma launch on the current GPU."""
    return _mma_plan(torch.cuda.current_device(), kernels.active_dir(), _DTYPE_CODE[dtype], int(w.nested), w.N, M,
                     w.K, blocks)


@functools.lru_cache(maxsize=4096)  # the plan asks the runtime for the residency: microseconds a launch
def _mma_plan(device: int, kernel_dir: Path, dtype: int, nested: int, N: int, M: int, K: int,
              blocks: int) -> tuple[int, int, int, int]:
    """(blocks, batch rows an item, workspace floats, tickets) of the launch by the library of `kernel_dir`
    (the active one: a variant may plan otherwise)."""
    lib = kernels.library_for(kernel_dir)
    got_blocks, m_tile = ctypes.c_int(blocks), ctypes.c_int(0)
    kernels.check(lib.q4_mma_plan(dtype, nested, N, M, K, ctypes.byref(got_blocks), ctypes.byref(m_tile)))
    floats, tickets = ctypes.c_long(0), ctypes.c_int(0)
    kernels.check(lib.q4_mma_scratch(N, M, got_blocks.value, ctypes.byref(floats), ctypes.byref(tickets)))
    return got_blocks.value, m_tile.value, floats.value, tickets.value


def _mma_scratch_for(device: torch.device, stream: int, floats: int, tickets: int):
    key = (device.index if device.index is not None else torch.cuda.current_device(), stream)
    ws, tk = _mma_scratch.get(key, (None, None))
    if ws is None or ws.numel() < floats or tk.numel() < tickets:
        ws = torch.empty(max(floats, 1), dtype=torch.float32, device=device)
        tk = torch.zeros(max(tickets, 1), dtype=torch.int32, device=device)
        _mma_scratch[key] = (ws, tk)
    return ws, tk


def mma_gemm(A: torch.Tensor, w: Q4Weight, bias: torch.Tensor | None = None, *, blocks: int = 0,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """The mma kernel with its grid chosen by hand (`blocks` blocks of 8-16 warps split the work evenly; 0 lets
    the library pick, as gemm_4bit(impl="mma") does). Few blocks make every warp cross many items, many
    make many warps share each item's K: both paths of the kernel's reduction."""
    if blocks < 0:
        raise ValueError(f"blocks must be >= 0 (0: the library picks), got {blocks}")
    _check(A, w, bias, "mma")
    A2 = A.reshape(-1, w.K)
    _check_runs("mma", A2, w)
    out = _check_out(out, A2, w, bias) if out is not None else torch.empty(A2.shape[0], w.N, dtype=A.dtype,
                                                                           device=A.device)
    return _mma(A2, w, bias, out, blocks).reshape(*A.shape[:-1], w.N)


def _mma(A2: torch.Tensor, w: Q4Weight, bias: torch.Tensor | None, out: torch.Tensor, blocks: int = 0) -> torch.Tensor:
    A2 = A2.contiguous()
    M = A2.shape[0]
    with torch.cuda.device(A2.device):
        blocks, _, floats, tickets = _mma_launch(w, M, A2.dtype, blocks)
    stream = torch.cuda.current_stream(A2.device).cuda_stream
    ws, tk = _mma_scratch_for(A2.device, stream, floats, tickets)
    nested = w.nested
    kernels.check(kernels.library().q4_mma_gemm(
        _DTYPE_CODE[A2.dtype], int(nested), A2.data_ptr(), w.packed.data_ptr(), w.absmax.data_ptr(),
        w.nested_absmax.data_ptr() if nested else None, w.nested_code.data_ptr() if nested else None,
        w.nested_offset if nested else 0.0, w.code.data_ptr(),
        bias.contiguous().data_ptr() if bias is not None else None, out.data_ptr(), M, w.N, w.K, w.blocksize,
        blocks, ws.data_ptr(), tk.data_ptr(), stream))
    return out


def dequantize_gpu(w: Q4Weight, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight [N, K] in `dtype`, decoded by the dequantize kernel (one pass, no cache)."""
    lib = kernels.library()
    out = torch.empty(w.N, w.K, dtype=dtype, device=w.device)
    nested = w.nested
    kernels.check(lib.q4_dequantize(
        _DTYPE_CODE[dtype], int(nested), w.packed.data_ptr(), w.absmax.data_ptr(),
        w.nested_absmax.data_ptr() if nested else None, w.nested_code.data_ptr() if nested else None,
        w.nested_offset if nested else 0.0, w.code.data_ptr(), out.data_ptr(), w.N, w.K, w.blocksize,
        torch.cuda.current_stream(w.device).cuda_stream))
    return out


def _bnb_state(w: Q4Weight):
    cache = _cache_of(w)
    if "bnb" not in cache:
        from bitsandbytes.functional import QuantState
        nested = None
        if w.nested:
            nested = QuantState(absmax=w.nested_absmax, code=w.nested_code, blocksize=formats.NESTED_BLOCKSIZE,
                                dtype=torch.float32)
        state = QuantState(absmax=w.absmax, shape=torch.Size(w.shape), code=w.code, blocksize=w.blocksize,
                           quant_type=w.quant_type, dtype=w.dtype, state2=nested,
                           offset=torch.tensor(w.nested_offset, device=w.device) if w.nested else None)
        cache["bnb"] = (w.packed.view(-1, 1), state)
    return cache["bnb"]


def _bnb(A2: torch.Tensor, w: Q4Weight, bias: torch.Tensor | None) -> torch.Tensor:
    import bitsandbytes as bnb
    packed, state = _bnb_state(w)
    if state.dtype != A2.dtype:  # bitsandbytes dequantizes into the state's dtype; match the activations
        state.dtype = A2.dtype
    return bnb.matmul_4bit(A2, packed.t(), quant_state=state, bias=bias)


def gemm_4bit(A: torch.Tensor, w: Q4Weight, bias: torch.Tensor | None = None, impl: str = "reference",
              out: torch.Tensor | None = None) -> torch.Tensor:
    """A[..., K] @ dequant(w)[N, K]^T (+ bias) -> [..., N] in A.dtype, computed by `impl` (see module doc).

    `out`, when given, is a contiguous [M, N] tensor the result is written into (and returned); it may not
    share memory with A, the weight or the bias."""
    _check(A, w, bias, impl)
    lead = A.shape[:-1]
    A2 = A.reshape(-1, w.K)
    M = A2.shape[0]
    out = torch.empty(M, w.N, dtype=A.dtype, device=A.device) if out is None else _check_out(out, A2, w, bias)
    if impl == "auto":
        impl = auto_impl(w.N, w.K, M, A2.dtype, A2.device, w.quant_type, w.blocksize)
    _check_runs(impl, A2, w)
    shaped = out if A.dim() == 2 else out.view(*lead, w.N)  # the caller's own `out` when A is [M, K]
    if M == 0:
        return shaped
    if impl == "reference":
        out.copy_(_reference(A2, w, bias))
    elif impl in _KERNEL_IMPL:
        _kernel(impl, A2, w, bias, out)
    elif impl == "mma":
        _mma(A2, w, bias, out)
    elif impl == "torch_int4":  # torch allocates its own output
        out.copy_(int4_peer.matmul(A2, w, int4_state(w)) + (bias if bias is not None else 0))
    elif impl in ("dequant_blas", "dense"):
        if impl == "dense":
            W = dense_weight(w, A2.dtype)
        else:
            W = dequantize_gpu(w, A2.dtype) if A2.is_cuda else formats.dequantize(w).to(A2.dtype)
        # addmm/mm with out= is the same BLAS call F.linear makes, without a second output buffer
        torch.addmm(bias, A2, W.t(), out=out) if bias is not None else torch.mm(A2, W.t(), out=out)
    else:
        out.copy_(_bnb(A2, w, bias))  # bitsandbytes allocates its own output
    return shaped
