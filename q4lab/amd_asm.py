"""AMD device assembly without an AMD card: what each kernel instance uses on each AMD target.

Debian's clang-19 compiles every kernels/*.cu for a gfx target to device assembly (hipcc 5.2's clang 15
knows neither gfx1151, gfx1201 nor gfx942). The `.amdgpu_metadata` block of that assembly gives each kernel
instance's registers, LDS bytes and spills; `waves_per_simd` turns them into the occupancy a researcher
would otherwise need the card for. `q4lab resources --arch gfx1201` prints the table.

The headers are Debian's HIP 5.2 (`libamdhip64-dev`). Without the device libraries (`-nogpulib`: none for
these targets in Debian), HIP 5.2's `threadIdx`, `blockDim`, `blockIdx` and `__syncthreads` would be calls
to external functions, and a kernel that calls out is charged the callee's registers and a dynamic stack:
`OCKL_SHIM` defines those few functions inline with the builtins ROCm 6's headers use, so the counts are
the kernel's own (q4_dequant on gfx1201: 13 VGPRs with it, 45 without).

Assembly is cached under `kernels.cache_root() / "amd-asm"` by kernel source hash, compiler and flags.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

from q4lab import kernels
from q4lab.kernels import KernelError

CLANG = "clang++-19"
AMD_TARGETS = ("gfx1100", "gfx1201", "gfx1151", "gfx942")
FLAGS = ("-std=c++17", "-O3", "-x", "hip", "-nogpulib", "--cuda-device-only")

OCKL_SHIM = """\
// Included after hip/hip_runtime.h: defines inline what HIP 5.2's headers declare for the device libraries.
extern "C" __device__ inline size_t __ockl_get_local_id(unsigned d) {
  return d == 0 ? __builtin_amdgcn_workitem_id_x() : d == 1 ? __builtin_amdgcn_workitem_id_y()
                                                            : __builtin_amdgcn_workitem_id_z();
}
extern "C" __device__ inline size_t __ockl_get_group_id(unsigned d) {
  return d == 0 ? __builtin_amdgcn_workgroup_id_x() : d == 1 ? __builtin_amdgcn_workgroup_id_y()
                                                             : __builtin_amdgcn_workgroup_id_z();
}
extern "C" __device__ inline size_t __ockl_get_local_size(unsigned d) {
  return d == 0 ? __builtin_amdgcn_workgroup_size_x() : d == 1 ? __builtin_amdgcn_workgroup_size_y()
                                                               : __builtin_amdgcn_workgroup_size_z();
}
#define Q4_SHIM_FENCE(scope)                                                                  \\
  switch (order) {                                                                            \\
    case __memory_order_acquire: __builtin_amdgcn_fence(__ATOMIC_ACQUIRE, scope); break;      \\
    case __memory_order_release: __builtin_amdgcn_fence(__ATOMIC_RELEASE, scope); break;      \\
    default: __builtin_amdgcn_fence(__ATOMIC_SEQ_CST, scope);                                 \\
  }
extern "C" __device__ inline void __atomic_work_item_fence(__cl_mem_fence_flags, __memory_order order,
                                                           __memory_scope scope) {
  if (scope == __memory_scope_work_group) { Q4_SHIM_FENCE("workgroup") }
  else if (scope == __memory_scope_device) { Q4_SHIM_FENCE("agent") }
  else { Q4_SHIM_FENCE("") }
}
"""


@dataclass(frozen=True)
class Arch:
    """What bounds the waves a SIMD holds. Numbers as LLVM 19 uses them (AMDGPUBaseInfo.cpp:
    getTotalNumVGPRs, getVGPRAllocGranule, getMaxWavesPerEU) and as the ISA guides give the LDS."""
    vgprs_per_simd: int  # VGPRs each SIMD lane holds for all its waves (gfx90a/gfx942: AGPRs included)
    vgpr_granule: int    # a wave's VGPRs are allocated in blocks of this many
    max_waves_per_simd: int
    lds_bytes: int       # LDS of one CU (gfx9) or WGP (gfx10+ in WGP mode, the compiler's default)
    simds: int           # SIMDs sharing that LDS: a block's waves spread over them
    simd_sgprs: bool     # gfx9: SGPRs are a per-SIMD file too (gfx10+ give every wave its own 106)

    def describe(self) -> str:
        return (f"{self.vgprs_per_simd} VGPRs a SIMD lane in blocks of {self.vgpr_granule}, at most "
                f"{self.max_waves_per_simd} waves a SIMD, {self.lds_bytes // 1024} KiB LDS for "
                f"{self.simds} SIMDs")


# RDNA3 (gfx1100), RDNA3.5 (gfx1151) and RDNA4 (gfx1201) have the large register file (LLVM's
# Feature1_5xVGPRs: 1536 wave32 VGPRs, granule 24) and 128 KiB LDS a WGP; CDNA3 (gfx942) has 512 unified
# VGPR+AGPR registers (wave64, granule 8), 8 waves a SIMD and 64 KiB LDS a CU. tests/test_kernels.py
# checks the waves against the compiler's own "; Occupancy:" note for every instance.
ARCHS = {
    "gfx1100": Arch(1536, 24, 16, 128 * 1024, 4, simd_sgprs=False),
    "gfx1151": Arch(1536, 24, 16, 128 * 1024, 4, simd_sgprs=False),
    "gfx1201": Arch(1536, 24, 16, 128 * 1024, 4, simd_sgprs=False),
    "gfx942": Arch(512, 8, 8, 64 * 1024, 4, simd_sgprs=True),
}


@dataclass(frozen=True)
class KernelResources:
    target: str
    source: str          # the .cu file
    symbol: str          # mangled
    name: str            # readable: the template's parameter names with this instance's arguments
    vgprs: int           # gfx942: VGPRs and AGPRs together, as allocated
    agprs: int
    sgprs: int
    lds_bytes: int       # static LDS a block
    scratch_bytes: int   # private (scratch) memory a lane: spills and stack arrays
    vgpr_spills: int
    sgpr_spills: int
    wave_size: int
    block_threads: int   # the largest block the kernel is compiled for (its launch bounds)
    compiler_occupancy: int  # LLVM's own waves-per-SIMD note, a cross-check of waves_per_simd


def find_clang() -> Path:
    found = shutil.which(CLANG)
    if found is None:
        raise KernelError(f"{CLANG} not found: on Debian `apt-get install clang-19 libamdhip64-dev` "
                          f"(scripts/setup.sh --system does)")
    return Path(found)


@lru_cache(maxsize=None)
def _clang_version(clang: Path) -> str:
    return subprocess.run([str(clang), "--version"], capture_output=True, text=True).stdout


def compile_command(clang: Path, target: str, src: Path, out: Path, shim: Path) -> list[str]:
    return [str(clang), *FLAGS, f"--offload-arch={target}", f"-I{src.parent}", "-include", "hip/hip_runtime.h",
            "-include", str(shim), "-S", str(src), "-o", str(out)]


def _cache_dir(clang: Path, kernel_dir: Path) -> Path:
    key = hashlib.sha256((_clang_version(clang) + OCKL_SHIM + " ".join(FLAGS)).encode()).hexdigest()[:8]
    return kernels.cache_root() / "amd-asm" / f"{kernels.source_hash(kernel_dir)}-{key}"


def assembly(targets: tuple[str, ...] = AMD_TARGETS,
             kernel_dir: Path = kernels.KERNEL_DIR) -> dict[tuple[str, str], Path]:
    """{(target, source file name): assembly path} for every kernels/*.cu, compiled in parallel where not
    cached. A failed compile raises KernelError with the compiler's message."""
    unknown = [t for t in targets if t not in ARCHS]
    if unknown:
        raise KernelError(f"unknown AMD target {', '.join(unknown)}: use {', '.join(AMD_TARGETS)} or all")
    clang = find_clang()
    folder = _cache_dir(clang, kernel_dir)
    folder.mkdir(parents=True, exist_ok=True)
    shim = folder / "ockl_shim.h"
    if not shim.exists():
        shim.write_text(OCKL_SHIM)
    jobs = {(t, src.name): (src, folder / f"{src.stem}.{t}.s")
            for t in targets for src in sorted(kernel_dir.glob("*.cu"))}

    def compile_one(target: str, src: Path, out: Path) -> None:
        if out.exists():
            return
        with tempfile.NamedTemporaryFile(dir=folder, suffix=".s", delete=False) as tmp:
            tmp_path = Path(tmp.name)
        cmd = compile_command(clang, target, src, tmp_path, shim)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tmp_path.unlink(missing_ok=True)
            raise KernelError(f"{CLANG} failed on {src.name} for {target} (exit {proc.returncode}):\n"
                              f"{' '.join(cmd)}\n{proc.stderr[-3000:]}")
        tmp_path.replace(out)  # atomic: a concurrent reader never sees half an assembly file

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for done in [pool.submit(compile_one, key[0], src, out) for key, (src, out) in jobs.items()]:
            done.result()
    return {key: out for key, (_, out) in jobs.items()}


def _kernel_notes(asm: str) -> dict[str, dict[str, str]]:
    """{symbol: {key: value}} from the "; Kernel info:" comment that follows each kernel's code."""
    notes = {}
    for m in re.finditer(r"^\s*\.size\s+([^,\s]+),.*\n(?:.*\n){0,3}?; Kernel info:\n((?:;.*\n)+)", asm, re.M):
        notes[m.group(1)] = dict(re.findall(r"^; (\w+)\s*[:=]\s*(\S+)", m.group(2), re.M))
    return notes


def template_parameters(kernel_dir: Path = kernels.KERNEL_DIR) -> dict[str, list[str]]:
    """{kernel: its template parameter names}, read from the `template <...> __global__` declarations (their
    launch bounds may call a function: `__launch_bounds__(q4_mma_warps(MT8) * 32, 1)`)."""
    declaration = re.compile(r"template\s*<([^<>]*)>\s*__global__\s+void\s+"
                             r"(?:__launch_bounds__\((?:[^()]|\([^()]*\))*\)\s*)?(\w+)\s*\(")
    params = {}
    for src in sorted(kernel_dir.glob("*.cu")):
        for m in declaration.finditer(src.read_text()):
            params[m.group(2)] = [p.split()[-1] for p in m.group(1).split(",")]
    return params


def _readable(demangled: str, params: dict[str, list[str]]) -> str:
    """`void q4_gemm_kernel<0, 4, 8, true, true>(...)` -> `q4_gemm_kernel<DT=fp16,R=4,MT=8,NESTED=1,
    INTERLEAVED=1>`; DT is the activation dtype everywhere in kernels/ (q4_port.h numbers them)."""
    m = re.match(r"(?:void )?(\w+)<([^<>]*)>\(", demangled)
    if not m:
        return demangled.split("(")[0].removeprefix("void ")
    kernel, args = m.group(1), [a.strip() for a in m.group(2).split(",")]
    names = params.get(kernel)
    if names is None or len(names) != len(args):
        return f"{kernel}<{','.join(args)}>"
    dtypes = {str(code): name for name, code in kernels.DTYPE_CODES.items()}
    bools = {"true": "1", "false": "0"}
    shown = [dtypes.get(a, a) if n == "DT" else bools.get(a, a) for n, a in zip(names, args)]
    return f"{kernel}<{','.join(f'{n}={a}' for n, a in zip(names, shown))}>"


def _demangle(symbols: list[str]) -> list[str]:
    tool = shutil.which("c++filt") or shutil.which("llvm-cxxfilt-19")
    if tool is None or not symbols:
        return symbols
    out = subprocess.run([tool], input="\n".join(symbols), capture_output=True, text=True).stdout.splitlines()
    return out if len(out) == len(symbols) else symbols


def parse(asm: str, target: str, source: str, params: dict[str, list[str]]) -> list[KernelResources]:
    """One KernelResources per kernel symbol of an assembly file, in the file's order; `params` are the
    kernels' template parameter names (`template_parameters`), read once for all the files."""
    block = re.search(r"^\s*\.amdgpu_metadata\s*\n(.*?)^\s*\.end_amdgpu_metadata", asm, re.M | re.S)
    if block is None:
        raise KernelError(f"no .amdgpu_metadata block in the {target} assembly of {source}")
    metadata = yaml.safe_load(block.group(1).rstrip())["amdhsa.kernels"]
    notes = _kernel_notes(asm)
    names = _demangle([k[".name"] for k in metadata])
    rows = []
    for k, demangled in zip(metadata, names):
        note = notes.get(k[".name"], {})
        rows.append(KernelResources(
            target=target, source=source, symbol=k[".name"], name=_readable(demangled, params),
            vgprs=k[".vgpr_count"], agprs=int(note.get("NumAgprs", 0)), sgprs=k[".sgpr_count"],
            lds_bytes=k[".group_segment_fixed_size"], scratch_bytes=k[".private_segment_fixed_size"],
            vgpr_spills=k[".vgpr_spill_count"], sgpr_spills=k[".sgpr_spill_count"],
            wave_size=k[".wavefront_size"], block_threads=k[".max_flat_workgroup_size"],
            compiler_occupancy=int(note.get("Occupancy", 0))))
    return rows


def waves_per_simd(k: KernelResources) -> tuple[int, str]:
    """(waves a SIMD holds, what limits it: vgprs, sgprs, lds or max), for blocks of `block_threads`."""
    arch = ARCHS[k.target]
    limits = {"max": arch.max_waves_per_simd}
    granules = -(-max(k.vgprs, 1) // arch.vgpr_granule)
    limits["vgprs"] = max(arch.vgprs_per_simd // (granules * arch.vgpr_granule), 1)
    if arch.simd_sgprs:  # LLVM's getOccupancyWithNumSGPRs for gfx8/gfx9
        limits["sgprs"] = 10 if k.sgprs <= 80 else 9 if k.sgprs <= 88 else 8 if k.sgprs <= 100 else 7
    if k.lds_bytes:
        waves_a_block = -(-k.block_threads // k.wave_size)
        limits["lds"] = max((arch.lds_bytes // k.lds_bytes) * waves_a_block // arch.simds, 1)
    limiter = min(limits, key=lambda name: (limits[name], name != "max"))
    return limits[limiter], limiter


def resources(targets: tuple[str, ...] = AMD_TARGETS,
              kernel_dir: Path = kernels.KERNEL_DIR) -> list[KernelResources]:
    """Every kernel instance of every kernels/*.cu on every target, compiled (or read from the cache)."""
    params = template_parameters(kernel_dir)
    rows = []
    for (target, source), path in assembly(targets, kernel_dir).items():
        rows += parse(path.read_text(), target, source, params)
    return rows


TABLE_COLUMNS = ("kernel", "VGPRs", "AGPRs", "SGPRs", "LDS bytes", "scratch bytes", "VGPR spills",
                 "SGPR spills", "waves/SIMD", "limited by")


def table(rows: list[KernelResources]) -> str:
    """A markdown table, one row a kernel instance."""
    cells = [[k.name, k.vgprs, k.agprs, k.sgprs, k.lds_bytes, k.scratch_bytes, k.vgpr_spills, k.sgpr_spills,
              *waves_per_simd(k)] for k in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(TABLE_COLUMNS, *cells)]
    line = lambda values: "| " + " | ".join(str(v).ljust(w) for v, w in zip(values, widths)) + " |"
    return "\n".join([line(TABLE_COLUMNS), line("-" * w for w in widths), *map(line, cells)])


def add_resources_arguments(parser) -> None:
    parser.add_argument("--arch", default="all",
                        help=f"comma-separated AMD targets, or all ({','.join(AMD_TARGETS)}); default all")


def resources_command(args) -> int:
    targets = AMD_TARGETS if args.arch == "all" else tuple(t.strip() for t in args.arch.split(","))
    rows = resources(targets)
    for target in targets:
        arch = ARCHS[target]
        mine = [k for k in rows if k.target == target]
        print(f"## {target}: {arch.describe()}\n")
        print(table(mine) + "\n")
    return 0
