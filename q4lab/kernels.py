"""Build, cache and load the kernel library (kernels/*.cu) through a plain C interface.

Why a C library and not torch.utils.cpp_extension: the kernels include no torch headers, so the library
builds with nvcc or hipcc alone (on a CPU-only machine too), can be carried to a GPU machine as one file,
and CI builds the real thing. ctypes passes raw pointers, sizes and the current stream.

Libraries are cached under `cache_root()` (env `Q4LAB_CACHE`, default `~/.cache/q4lab`) by kernel source
hash + vendor + GPU targets + compiler version; `Q4LAB_LIB` names a library file to use as is.

Variants: a copy of kernels/ with a change, timed beside the shipped kernels in one run. `Q4LAB_VARIANTS`
names their folders (os.pathsep between them; `q4lab bench --kernels` sets it), `variants()` maps each one's
source hash to its folder, and a call inside `using(folder)` runs on that folder's library.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from contextvars import ContextVar
from functools import lru_cache
from pathlib import Path

import torch

from q4lab.launch import KERNEL_DIR

LIB_NAME = "libq4lab.so"
# What `q4lab build` makes when there is no GPU to ask: the NVIDIA archs the project supports.
DEFAULT_CUDA_TARGETS = ("sm_80", "sm_89", "sm_90")
# The simt (rows per warp, M tile) configurations in the order of the library's 12-entry residency tables
# (q4_simt_config, q4_simt_blocks_per_sm: index log2(R) * 4 + log2(MT)).
SIMT_TABLE_ORDER = tuple((R, MT) for R in (1, 2, 4) for MT in (1, 2, 4, 8))
DTYPE_CODES = {"fp16": 0, "bf16": 1, "fp32": 2}  # activation dtypes as the C interface numbers them (q4_port.h)
_ACTIVE_DIR: ContextVar[Path] = ContextVar("q4lab_kernel_dir", default=KERNEL_DIR)  # what library() loads


class KernelError(RuntimeError):
    """No usable kernel library: no compiler, no GPU, a failed build, or a library for another GPU."""


def sources(kernel_dir: Path = KERNEL_DIR) -> list[Path]:
    files = sorted(kernel_dir.glob("*.cu")) + sorted(kernel_dir.glob("*.h"))
    if not files:
        raise KernelError(f"no kernel sources in {kernel_dir}: run from a q4lab checkout "
                          f"(pip install -e .) or set Q4LAB_KERNELS to its kernels/ folder")
    return files


# A string or character literal (kept whole), or a C/C++ comment (dropped)
_LEXEME = re.compile(r'''"(?:\\.|[^"\\\n])*"|'(?:\\.|[^'\\\n])*'|//[^\n]*|/\*.*?\*/''', re.S)


def compiled_text(source: str) -> str:
    """What the compiler reads of a source: comments gone, each line's whitespace collapsed, blank lines
    dropped. Lines stay apart, since a preprocessor directive ends at its line."""
    code = _LEXEME.sub(lambda m: " " if m[0][:2] in ("//", "/*") else m[0], source)
    lines = (" ".join(line.split()) for line in code.splitlines())
    return "\n".join(line for line in lines if line)


def source_hash(kernel_dir: Path = KERNEL_DIR) -> str:
    """The kernels' version: a hash of what the compiler reads of every source, so an edit to comments or
    whitespace keeps it and any other edit changes it."""
    h = hashlib.sha256()
    for f in sources(kernel_dir):
        h.update(f.name.encode() + b"\0" + compiled_text(f.read_text(encoding="utf-8")).encode() + b"\0")
    return h.hexdigest()[:16]


def raw_byte_hash(kernel_dir: Path = KERNEL_DIR) -> str:
    """The kernel hash datasets recorded before `source_hash` ignored comments: every source's raw bytes.
    Kept only to verify those datasets against their commit's kernels/."""
    h = hashlib.sha256()
    for f in sources(kernel_dir):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def is_current(kernel_hash: str, kernel_dir: Path = KERNEL_DIR) -> bool:
    """Whether rows recorded with `kernel_hash` were measured with the kernels in `kernel_dir` (by either
    hash: a dataset of the raw-byte hash is current while the bytes are the same)."""
    return kernel_hash in (source_hash(kernel_dir), raw_byte_hash(kernel_dir))


def torch_vendor() -> str:
    """Which GPU stack this torch was built for: "cuda", "rocm", or "cpu"."""
    if getattr(torch.version, "hip", None):
        return "rocm"
    return "cuda" if torch.version.cuda else "cpu"


def gpu_arch(device: int | None = None) -> str | None:
    """`sm_90` / `gfx1100` of the current GPU, or None without one."""
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(device if device is not None else torch.cuda.current_device())
    if torch_vendor() == "rocm":
        return props.gcnArchName.split(":")[0]
    return f"sm_{props.major}{props.minor}"


def find_compiler(vendor: str) -> Path | None:
    name, home = ("hipcc", os.environ.get("ROCM_PATH", "/opt/rocm")) if vendor == "rocm" else \
                 ("nvcc", os.environ.get("CUDA_HOME", "/usr/local/cuda"))
    found = shutil.which(name) or (Path(home) / "bin" / name if (Path(home) / "bin" / name).exists() else None)
    return Path(found) if found else None


@lru_cache(maxsize=None)
def compiler_version(compiler: Path) -> str:
    out = subprocess.run([str(compiler), "--version"], capture_output=True, text=True).stdout.strip()
    lines = [ln for ln in out.splitlines() if ln.strip()]
    # hipcc prints its own version, then that of the nvcc or clang it drives
    hip = [ln for ln in lines if ln.startswith("HIP version")]
    return hip[0] if hip else lines[-1] if lines else "unknown"


def cache_root() -> Path:
    return Path(os.environ.get("Q4LAB_CACHE", Path.home() / ".cache" / "q4lab"))


def library_path(vendor: str, targets: tuple[str, ...], compiler: Path, kernel_dir: Path = KERNEL_DIR) -> Path:
    cc = hashlib.sha256(compiler_version(compiler).encode()).hexdigest()[:8]
    return cache_root() / f"{vendor}-{'-'.join(targets)}-{source_hash(kernel_dir)}-{cc}" / LIB_NAME


def build_vendor() -> str:
    """The vendor to build for: torch's when it is a GPU build, else whichever compiler is installed."""
    vendor = torch_vendor()
    if vendor != "cpu":
        return vendor
    if find_compiler("cuda"):
        return "cuda"
    return "rocm" if find_compiler("rocm") else "cuda"


def compile_command(vendor: str, targets: tuple[str, ...], compiler: Path, out: Path,
                    kernel_dir: Path = KERNEL_DIR) -> list[str]:
    defines = [f'-DQ4_SOURCE_HASH="{source_hash(kernel_dir)}"', f'-DQ4_TARGETS="{",".join(targets)}"']
    cu = [str(f) for f in sources(kernel_dir) if f.suffix == ".cu"]
    if vendor == "rocm":
        arch = [f"--offload-arch={t}" for t in targets]
        return [str(compiler), "-O3", "-std=c++17", "-shared", "-fPIC", *arch, *defines, *cu, "-o", str(out)]
    gencode = []
    for t in targets:
        if not t.startswith("sm_"):
            raise KernelError(f"{t!r} is not an NVIDIA target: use sm_80, sm_89, sm_90, ...")
        gencode += ["-gencode", f"arch=compute_{t[3:]},code={t}"]
    return [str(compiler), "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-lineinfo",
            "-Xptxas", "-v", *gencode, *defines, *cu, "-o", str(out)]


def build(targets: tuple[str, ...] | None = None, vendor: str | None = None, force: bool = False,
          verbose: bool = False, kernel_dir: Path = KERNEL_DIR) -> Path:
    """Build the library for `targets` (default: this GPU, else every supported NVIDIA arch); return its path.

    Cached: an existing library for the same sources, targets and compiler is reused unless `force`.
    `kernel_dir`: another version of kernels/ (an experiment to time beside the shipped one).
    """
    vendor = vendor or build_vendor()
    if not targets:
        arch = gpu_arch()
        if arch:
            targets = (arch,)
        elif vendor == "cuda":
            targets = DEFAULT_CUDA_TARGETS
        else:
            raise KernelError("no GPU to read the arch from: name the AMD targets, e.g. "
                              "`q4lab build --arch gfx1100`")
    targets = tuple(targets)
    compiler = find_compiler(vendor)
    if compiler is None:
        tool = "hipcc (ROCm)" if vendor == "rocm" else "nvcc (the CUDA toolkit)"
        raise KernelError(f"no {tool} found on PATH: install it, or set "
                          f"{'ROCM_PATH' if vendor == 'rocm' else 'CUDA_HOME'}, or point Q4LAB_LIB at a "
                          f"library built elsewhere with `q4lab build`")
    out = library_path(vendor, targets, compiler, kernel_dir)
    if out.exists() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out.parent, suffix=".so", delete=False) as tmp:
        tmp_path = Path(tmp.name)
    cmd = compile_command(vendor, targets, compiler, tmp_path, kernel_dir)
    env = {**os.environ, "HIP_PLATFORM": "amd"} if vendor == "rocm" else None
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    (out.parent / "build.log").write_text(" ".join(cmd) + "\n\n" + proc.stdout + proc.stderr)
    if proc.returncode != 0:
        tmp_path.unlink(missing_ok=True)
        raise KernelError(f"kernel build failed ({compiler.name} exit {proc.returncode}); the log is in "
                          f"{out.parent / 'build.log'}:\n{proc.stderr[-3000:]}")
    if verbose:
        print(proc.stderr[-2000:])
    tmp_path.replace(out)  # atomic: a concurrent loader never sees a half-written library
    return out


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.q4_gemm.argtypes = [i, i, i, p, p, p, p, p, f, p, p, p, i, i, i, i, i, i, p]
    lib.q4_gemm.restype = i
    lib.q4_dequantize.argtypes = [i, i, p, p, p, p, f, p, p, i, i, i, p]
    lib.q4_dequantize.restype = i
    lib.q4_simt_config.argtypes = [i, i, i, i, i, ctypes.POINTER(i), ctypes.POINTER(i), ctypes.POINTER(i)]
    lib.q4_simt_config.restype = i
    lib.q4_simt_blocks_per_sm.argtypes = [i, i, ctypes.POINTER(i)]
    lib.q4_simt_blocks_per_sm.restype = i
    lib.q4_mma_gemm.argtypes = [i, i, p, p, p, p, p, f, p, p, p, i, i, i, i, i, p, p, p]
    lib.q4_mma_gemm.restype = i
    lib.q4_mma_config.argtypes = [i, i, i, i, i, ctypes.POINTER(i), ctypes.POINTER(i)]
    lib.q4_mma_config.restype = i
    lib.q4_mma_plan.argtypes = [i, i, i, i, i, ctypes.POINTER(i), ctypes.POINTER(i)]
    lib.q4_mma_plan.restype = i
    lib.q4_mma_scratch.argtypes = [i, i, i, ctypes.POINTER(ctypes.c_long), ctypes.POINTER(i)]
    lib.q4_mma_scratch.restype = i
    lib.q4_mma_supported.argtypes = []
    lib.q4_mma_supported.restype = i
    for name in ("q4_source_hash", "q4_targets"):
        getattr(lib, name).restype = ctypes.c_char_p
    lib.q4_error_string.argtypes = [i]
    lib.q4_error_string.restype = ctypes.c_char_p
    return lib


def open_library(path: Path) -> ctypes.CDLL:
    """Load a library file and read what it was built for; works without a GPU."""
    try:
        return _declare(ctypes.CDLL(str(path)))
    except OSError as err:
        raise KernelError(f"cannot load {path}: {err}; rebuild it with `q4lab build --force`") from err


def library_targets(lib: ctypes.CDLL) -> tuple[str, ...]:
    return tuple(lib.q4_targets().decode().split(","))


def library() -> ctypes.CDLL:
    """The library for the current GPU, built from kernels/ or from the variant folder `using` is active for."""
    return library_for(_ACTIVE_DIR.get())


@lru_cache(maxsize=None)
def library_for(kernel_dir: Path) -> ctypes.CDLL:
    """The library for the current GPU built from `kernel_dir`: `Q4LAB_LIB` (kernels/ only), else the cache,
    else built now (first use)."""
    arch = gpu_arch()
    if arch is None:
        raise KernelError("no GPU visible to torch (torch.cuda.is_available() is False): the simt, gemv and "
                          "dequant_blas kernels need an NVIDIA or AMD GPU; use impl='reference' or 'dense' "
                          "on the CPU")
    explicit = os.environ.get("Q4LAB_LIB") if kernel_dir == KERNEL_DIR else None
    path = Path(explicit) if explicit else build((arch,), kernel_dir=kernel_dir)
    lib = open_library(path)
    targets = library_targets(lib)
    if arch not in targets:
        raise KernelError(f"{path} was built for {','.join(targets)}, but this GPU is {arch}: run "
                          f"`q4lab build --arch {arch}` (and unset Q4LAB_LIB if it points there)")
    built_from, sources_now = lib.q4_source_hash().decode(), source_hash(kernel_dir)
    if built_from != sources_now:
        raise KernelError(f"{path} was built from kernel sources {built_from}, but {kernel_dir} is now "
                          f"{sources_now}: run `q4lab build --force` (or point Q4LAB_LIB at a fresh build)")
    return lib


def variants() -> dict[str, Path]:
    """The variant folders `Q4LAB_VARIANTS` names, by their source hash (what a variant impl's name carries:
    "mma@<hash>")."""
    return _variants_named(os.environ.get("Q4LAB_VARIANTS", ""))


@lru_cache(maxsize=None)  # asked a point at a time: hash each folder once, as library_for builds it once
def _variants_named(folders: str) -> dict[str, Path]:
    return {source_hash(Path(f)): Path(f) for f in folders.split(os.pathsep) if f}


@contextmanager
def using(kernel_dir: Path):
    """Kernel calls inside run on the library built from `kernel_dir` (a variant of kernels/)."""
    token = _ACTIVE_DIR.set(Path(kernel_dir))
    try:
        yield
    finally:
        _ACTIVE_DIR.reset(token)


def active_dir() -> Path:
    """The kernels folder library() loads from now."""
    return _ACTIVE_DIR.get()


def check(err: int) -> None:
    if err != 0:
        msg = library().q4_error_string(err).decode()
        raise KernelError(f"kernel launch failed: {msg} (error {err})")


def info() -> dict[str, str]:
    vendor = build_vendor()
    compilers = {v: find_compiler(v) for v in ("cuda", "rocm")}
    facts = {
        "q4lab": __import__("q4lab").__version__,
        "torch": torch.__version__,
        "torch vendor": torch_vendor(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
        "gpu arch": gpu_arch() or "none",
        "nvcc": f"{compilers['cuda']} ({compiler_version(compilers['cuda'])})" if compilers["cuda"] else "not found",
        "hipcc": f"{compilers['rocm']} ({compiler_version(compilers['rocm'])})" if compilers["rocm"] else "not found",
        "kernel sources": f"{KERNEL_DIR} (hash {source_hash()})",
        "kernel cache": str(cache_root()),
        "platform": f"{platform.system()} {platform.machine()}",
    }
    compiler = compilers[vendor]
    arch = gpu_arch()
    if os.environ.get("Q4LAB_LIB"):
        facts["library"] = f"{os.environ['Q4LAB_LIB']} (from Q4LAB_LIB)"
    elif compiler and (arch or vendor == "cuda"):
        path = library_path(vendor, (arch,) if arch else DEFAULT_CUDA_TARGETS, compiler)
        facts["library"] = f"{path} ({'built' if path.exists() else 'not built yet: q4lab build'})"
    elif compiler:
        facts["library"] = "no GPU to read the AMD arch from: name it, e.g. q4lab build --arch gfx1100"
    else:
        facts["library"] = "cannot build here: no compiler"
    return facts


def add_info_arguments(parser) -> None:
    pass


def info_command(args) -> int:
    for key, value in info().items():
        print(f"{key:>15}: {value}")
    return 0


def add_build_arguments(parser) -> None:
    parser.add_argument("--arch", default=None,
                        help="comma-separated targets (sm_90,sm_80 or gfx1100); default: this GPU, "
                             f"else {','.join(DEFAULT_CUDA_TARGETS)}")
    parser.add_argument("--vendor", choices=("cuda", "rocm"), default=None, help="default: torch's, else the compiler found")
    parser.add_argument("--force", action="store_true", help="rebuild even when a cached library exists")


def build_command(args) -> int:
    targets = tuple(t.strip() for t in args.arch.split(",")) if args.arch else None
    path = build(targets, vendor=args.vendor, force=args.force)
    lib = open_library(path)
    print(f"built {path}\n  targets: {','.join(library_targets(lib))}\n  sources: {lib.q4_source_hash().decode()}"
          f"\n  log: {path.parent / 'build.log'}")
    return 0
