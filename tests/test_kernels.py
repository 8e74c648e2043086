"""The kernel library: nvcc builds it for the CI archs and q4lab loads it without a GPU; hipcc compiles every
kernel for AMD targets and the fused kernel's gfx1100 reduction uses DPP; every failure says what to do."""
from __future__ import annotations

import ctypes
import itertools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import q4lab
from q4lab import kernels

CI_TARGETS = ("sm_80", "sm_89", "sm_90")
HIP_OBJECT_TARGETS = ("gfx1030", "gfx90a", "gfx940")


def need(tool: str):
    if shutil.which(tool) is None:
        pytest.skip(f"SKIPPED LOUDLY: {tool} is not installed (make test installs it with apt; see scripts/setup.sh)")


@pytest.fixture(scope="module")
def cuda_library(tmp_path_factory):
    need("nvcc")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("Q4LAB_CACHE", str(tmp_path_factory.mktemp("kcache")))
        return kernels.build(CI_TARGETS, vendor="cuda")


def simt_config(lib, N: int, M: int, K: int, sm_count: int, blocks_per_sm: dict, dtype: str = "bf16",
                fixed: tuple[int, int] = (0, 0)) -> tuple[int, int] | None:
    """(rows per warp, activation rows per block) the library's simt launcher picks, with `fixed` (R, MT)
    parts > 0 imposed; None when it refuses. Host code, no GPU."""
    table = (ctypes.c_int * len(kernels.SIMT_TABLE_ORDER))(*[blocks_per_sm[c] for c in kernels.SIMT_TABLE_ORDER])
    rows_per_warp, m_tile = ctypes.c_int(fixed[0]), ctypes.c_int(fixed[1])
    rc = lib.q4_simt_config(N, M, K, kernels.DTYPE_CODES[dtype], sm_count, table, ctypes.byref(rows_per_warp),
                            ctypes.byref(m_tile))
    return (rows_per_warp.value, m_tile.value) if rc == 0 else None


def test_nvcc_builds_the_library_for_the_ci_archs_and_it_loads_without_a_gpu(cuda_library):
    lib = kernels.open_library(cuda_library)
    assert kernels.library_targets(lib) == CI_TARGETS
    assert lib.q4_source_hash().decode() == kernels.source_hash()
    assert lib.q4_warp_size() == 32
    # the launch heuristics are plain host code in the library: callable without a GPU
    from q4lab import launch
    h100, h100_fp32 = launch.SM90_BLOCKS_PER_SM["bf16"], launch.SM90_BLOCKS_PER_SM["fp32"]
    assert simt_config(lib, 28672, 8, 8192, 132, h100) == (4, 8)
    assert simt_config(lib, 1024, 1, 4096, 132, h100) == (1, 1)
    # fp32 activations cost more a row: the 128256-row lm_head at M=2 reuses them over 4 weight rows (the
    # fp32 sweep: r4m2 196.2 us against r2m2's 275.4), where bf16 keeps 2
    assert simt_config(lib, 128256, 2, 4096, 132, h100_fp32, "fp32") == (4, 2)
    assert simt_config(lib, 128256, 2, 4096, 132, h100, "bf16") == (2, 2)
    # a fixed part is kept and the model picks the rest, past the M tile cap too; a part no instance has
    # is refused
    assert simt_config(lib, 28672, 8, 8192, 132, h100, fixed=(1, 0))[0] == 1
    assert simt_config(lib, 28672, 1, 8192, 132, h100, fixed=(0, 8)) == (4, 8)
    assert simt_config(lib, 28672, 1, 8192, 132, h100, fixed=(2, 4)) == (2, 4)
    assert simt_config(lib, 28672, 1, 8192, 132, h100, fixed=(3, 0)) is None
    # the launch model mirrors the launcher, on the H100's residencies and on a uniform one
    uniform = {c: 3 for c in launch.SIMT_CONFIGS}
    for N, M, K, sms, dtype, table in itertools.product(
            (1, 37, 512, 1024, 2112, 3072, 4224, 9216, 128256), (1, 2, 3, 5, 8, 9, 12, 64, 2048), (64, 4096, 14336),
            (108, 132, 304), ("bf16", "fp32"), ("sm90", "uniform")):
        residency = launch.SM90_BLOCKS_PER_SM[dtype] if table == "sm90" else uniform
        mirrored = launch.simt_launch(N, M, K, sms, residency, dtype)
        assert mirrored == simt_config(lib, N, M, K, sms, residency, dtype), (N, M, K, sms, dtype, table)


def test_a_second_build_reuses_the_cached_library(cuda_library, monkeypatch):
    mtime = cuda_library.stat().st_mtime_ns
    monkeypatch.setenv("Q4LAB_CACHE", str(cuda_library.parent.parent))
    assert kernels.build(CI_TARGETS, vendor="cuda") == cuda_library
    assert cuda_library.stat().st_mtime_ns == mtime


def test_a_library_for_another_arch_is_refused_with_the_build_command(cuda_library, monkeypatch):
    monkeypatch.setattr(kernels, "gpu_arch", lambda device=None: "sm_75")
    monkeypatch.setenv("Q4LAB_LIB", str(cuda_library))
    kernels.library.cache_clear()
    with pytest.raises(kernels.KernelError, match=r"built for sm_80,sm_89,sm_90.*q4lab build --arch sm_75"):
        kernels.library()
    kernels.library.cache_clear()


def test_a_library_from_other_sources_is_refused(cuda_library, monkeypatch):
    monkeypatch.setattr(kernels, "gpu_arch", lambda device=None: "sm_90")
    monkeypatch.setenv("Q4LAB_LIB", str(cuda_library))
    monkeypatch.setattr(kernels, "source_hash", lambda: "0123456789abcdef")
    kernels.library.cache_clear()
    with pytest.raises(kernels.KernelError, match="q4lab build --force"):
        kernels.library()
    kernels.library.cache_clear()


def test_no_gpu_gives_a_clear_error_and_the_cpu_impls_still_work():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    w = q4lab.quantize(torch.randn(8, 64), "nf4", 64)
    A = torch.randn(2, 64)
    with pytest.raises(kernels.KernelError, match="needs a GPU"):
        q4lab.gemm_4bit(A, w, impl="simt")
    kernels.library.cache_clear()
    with pytest.raises(kernels.KernelError, match="no GPU visible"):
        kernels.library()
    assert q4lab.gemm_4bit(A, w, impl="dense").shape == (2, 8)


def test_a_missing_compiler_says_what_to_install(monkeypatch):
    monkeypatch.setattr(kernels, "find_compiler", lambda vendor: None)
    with pytest.raises(kernels.KernelError, match=r"no nvcc \(the CUDA toolkit\) found.*Q4LAB_LIB"):
        kernels.build(("sm_90",), vendor="cuda")
    with pytest.raises(kernels.KernelError, match="no hipcc"):
        kernels.build(("gfx1100",), vendor="rocm")


def test_a_compile_error_keeps_the_log(tmp_path, monkeypatch):
    need("nvcc")
    bad = tmp_path / "kernels"
    bad.mkdir()
    (bad / "broken.cu").write_text("this is not C++\n")
    monkeypatch.setenv("Q4LAB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(kernels.KernelError, match="kernel build failed.*build.log"):
        kernels.build(("sm_90",), vendor="cuda", kernel_dir=bad)
    assert list((tmp_path / "cache").glob("*/build.log"))
    assert not list((tmp_path / "cache").glob("*/*.so"))  # no half-written library left behind


def test_another_kernel_folder_builds_apart_from_the_shipped_one(tmp_path):
    """gpu_kernels.py --variant times an experiment's kernels/ beside the shipped one: its sources, hash and
    cache entry are the other folder's, and the shipped folder stays the default."""
    need("nvcc")
    other = tmp_path / "kernels"
    shutil.copytree(kernels.KERNEL_DIR, other)
    (other / "q4_gemm.cu").write_text((other / "q4_gemm.cu").read_text() + "\nstatic int q4_an_experiment;\n")
    nvcc = kernels.find_compiler("cuda")
    cmd = kernels.compile_command("cuda", ("sm_90",), nvcc, tmp_path / "x.so", kernel_dir=other)
    assert str(other / "q4_gemm.cu") in cmd and str(kernels.KERNEL_DIR / "q4_gemm.cu") not in cmd
    assert f'-DQ4_SOURCE_HASH="{kernels.source_hash(other)}"' in cmd
    assert kernels.source_hash(other) != kernels.source_hash()
    assert kernels.library_path("cuda", ("sm_90",), nvcc, other) != kernels.library_path("cuda", ("sm_90",), nvcc)


def test_cli_info_and_build(cuda_library):
    env = {**os.environ, "Q4LAB_CACHE": str(cuda_library.parent.parent)}
    info = subprocess.run([sys.executable, "-m", "q4lab", "info"], capture_output=True, text=True, env=env)
    assert info.returncode == 0, info.stderr
    assert "nvcc:" in info.stdout and kernels.source_hash() in info.stdout
    built = subprocess.run([sys.executable, "-m", "q4lab", "build", "--arch", ",".join(CI_TARGETS)],
                           capture_output=True, text=True, env=env)
    assert built.returncode == 0, built.stderr
    assert str(cuda_library) in built.stdout and "sm_80,sm_89,sm_90" in built.stdout


def hipcc(args: list[str], out: Path) -> subprocess.Popen:
    cmd = ["hipcc", "-O3", "-std=c++17", *args, "-o", str(out)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "HIP_PLATFORM": "amd"})


def test_hipcc_compiles_every_kernel_for_amd_targets(tmp_path):
    need("hipcc")
    jobs = {}
    for target in HIP_OBJECT_TARGETS:
        for src in sorted(kernels.KERNEL_DIR.glob("*.cu")):
            out = tmp_path / f"{src.stem}.{target}.o"
            jobs[(src.name, target)] = (out, hipcc(["-fPIC", f"--offload-arch={target}", "-c", str(src)], out))
    failed = {k: p.communicate()[0][-2000:] for k, (out, p) in jobs.items() if p.wait() != 0}
    assert not failed, failed
    assert all(out.stat().st_size > 0 for out, _ in jobs.values())


@pytest.fixture(scope="module")
def gfx1100_asm(tmp_path_factory) -> str:
    """The fused kernel's gfx1100 device assembly (hipcc 5.2 builds no gfx1100 object, only assembly)."""
    need("hipcc")
    asm = tmp_path_factory.mktemp("gfx1100") / "q4_gemm.gfx1100.s"
    proc = hipcc(["--offload-arch=gfx1100", "-nogpulib", "--cuda-device-only", "-S",
                  str(kernels.KERNEL_DIR / "q4_gemm.cu")], asm)
    assert proc.wait() == 0, proc.communicate()[0][-2000:]
    text = asm.read_text()
    assert ".amdgcn_target \"amdgcn-amd-amdhsa--gfx1100" in text
    return text


def fused_body(asm: str, dtype: int, rows_per_warp: int) -> str:
    """One simt instance's body (MT=1, not nested, interleaved), up to its end marker."""
    start = asm.index(f"_Z14q4_gemm_kernelILi{dtype}ELi{rows_per_warp}ELi1ELb0ELb1EEvPKv9Q4WeightsS1_Pvi:")
    return asm[start:asm.index(".Lfunc_end", start)]


def test_gfx1100_fused_kernel_reduces_with_dpp(gfx1100_asm):
    body = fused_body(gfx1100_asm, kernels.DTYPE_CODES["fp16"], 4)
    for shift in (8, 4, 2, 1):
        assert f"row_ror:{shift}" in body, f"no DPP row_ror:{shift} in the gfx1100 reduction"


def test_gfx1100_fused_kernel_multiplies_fp16_with_dot2(gfx1100_asm):
    """fp16 activations go as packed pairs into v_dot2 against fp16 weight pairs built by two LDS reads (the
    second straight into the high half); bf16 keeps fp32 FMAs (its v_dot2_f32_bf16 is not used yet:
    docs/PERF.md, next experiment 4). Both extract a code's table offset with one v_perm_b32."""
    fp16 = fused_body(gfx1100_asm, kernels.DTYPE_CODES["fp16"], 1)
    bf16 = fused_body(gfx1100_asm, kernels.DTYPE_CODES["bf16"], 1)
    # one unrolled pipeline iteration: 2 groups x 4 steps x 4 pairs of one row
    assert fp16.count("v_dot2acc_f32_f16") == 32, fp16.count("v_dot2acc_f32_f16")
    assert fp16.count("ds_load_u16_d16_hi") == 32
    assert "v_dot2" not in bf16
    for body in (fp16, bf16):
        assert body.count("v_perm_b32") == 64, body.count("v_perm_b32")  # one a weight of the 64


def test_info_names_hipccs_own_version_and_no_cuda_library_for_amd(tmp_path, monkeypatch):
    hipcc = tmp_path / "hipcc"  # Debian's hipcc without an AMD GPU drives nvcc and prints its version too
    hipcc.write_text("#!/bin/sh\necho 'HIP version: 5.2.21153-0'\necho 'nvcc: NVIDIA (R) Cuda compiler driver'\n"
                     "echo 'Build cuda_13.0.r13.0/compiler.36424714_0'\n")
    hipcc.chmod(0o755)
    assert kernels.compiler_version(hipcc) == "HIP version: 5.2.21153-0"
    monkeypatch.delenv("Q4LAB_LIB", raising=False)
    monkeypatch.setattr(kernels, "build_vendor", lambda: "rocm")
    monkeypatch.setattr(kernels, "find_compiler", lambda vendor: hipcc if vendor == "rocm" else None)
    monkeypatch.setattr(kernels, "gpu_arch", lambda device=None: None)
    facts = kernels.info()
    assert facts["hipcc"] == f"{hipcc} (HIP version: 5.2.21153-0)" and facts["nvcc"] == "not found"
    assert "sm_" not in facts["library"] and "--arch gfx1100" in facts["library"]
