"""The kernel library: nvcc builds it for the CI archs and q4lab loads it without a GPU; hipcc compiles every
kernel for AMD targets and the fused kernel's gfx1100 fp16 multiplies with dot2; clang-19 compiles every
kernel to assembly for every AMD target (reductions keep DPP), and `q4lab resources` reads their registers
and waves from it; every failure says what to do."""
from __future__ import annotations

import ctypes
import dataclasses
import itertools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import q4lab
from q4lab import amd_asm, kernels

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


@pytest.mark.slow  # a kernel build
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


@pytest.mark.slow  # a kernel build
def test_a_second_build_reuses_the_cached_library(cuda_library, monkeypatch):
    mtime = cuda_library.stat().st_mtime_ns
    monkeypatch.setenv("Q4LAB_CACHE", str(cuda_library.parent.parent))
    assert kernels.build(CI_TARGETS, vendor="cuda") == cuda_library
    assert cuda_library.stat().st_mtime_ns == mtime


@pytest.mark.slow  # a kernel build
def test_a_library_for_another_arch_is_refused_with_the_build_command(cuda_library, monkeypatch):
    monkeypatch.setattr(kernels, "gpu_arch", lambda device=None: "sm_75")
    monkeypatch.setenv("Q4LAB_LIB", str(cuda_library))
    kernels.library_for.cache_clear()
    with pytest.raises(kernels.KernelError, match=r"built for sm_80,sm_89,sm_90.*q4lab build --arch sm_75"):
        kernels.library()
    kernels.library_for.cache_clear()


@pytest.mark.slow  # a kernel build
def test_a_library_from_other_sources_is_refused(cuda_library, monkeypatch):
    monkeypatch.setattr(kernels, "gpu_arch", lambda device=None: "sm_90")
    monkeypatch.setenv("Q4LAB_LIB", str(cuda_library))
    monkeypatch.setattr(kernels, "source_hash", lambda kernel_dir=None: "0123456789abcdef")
    kernels.library_for.cache_clear()
    with pytest.raises(kernels.KernelError, match="q4lab build --force"):
        kernels.library()
    kernels.library_for.cache_clear()


def test_no_gpu_gives_a_clear_error_and_the_cpu_impls_still_work():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    w = q4lab.quantize(torch.randn(8, 64), "nf4", 64)
    A = torch.randn(2, 64)
    with pytest.raises(kernels.KernelError, match="needs a GPU"):
        q4lab.gemm_4bit(A, w, impl="simt")
    kernels.library_for.cache_clear()
    with pytest.raises(kernels.KernelError, match="no GPU visible"):
        kernels.library()
    assert q4lab.gemm_4bit(A, w, impl="dense").shape == (2, 8)


def test_a_missing_compiler_says_what_to_install(monkeypatch):
    monkeypatch.setattr(kernels, "find_compiler", lambda vendor: None)
    with pytest.raises(kernels.KernelError, match=r"no nvcc \(the CUDA toolkit\) found.*Q4LAB_LIB"):
        kernels.build(("sm_90",), vendor="cuda")
    with pytest.raises(kernels.KernelError, match="no hipcc"):
        kernels.build(("gfx1100",), vendor="rocm")


@pytest.mark.slow  # a kernel build
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
    """Q4LAB_KERNELS=DIR measures an experiment's kernels/ beside the shipped one: its sources, hash and
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


@pytest.mark.slow  # a kernel build
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


@pytest.mark.slow  # a kernel build
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


def kernel_body(asm: str, symbol: str) -> str:
    """One kernel's code in an AMD assembly file, from its label to its end marker."""
    start = asm.index(f"\n{symbol}:")
    return asm[start:asm.index(".Lfunc_end", start)]


def fused_body(asm: str, dtype: int, rows_per_warp: int) -> str:
    """One simt instance's body (MT=1, not nested, interleaved)."""
    return kernel_body(asm, f"_Z14q4_gemm_kernelILi{dtype}ELi{rows_per_warp}ELi1ELb0ELb1EEvPKv9Q4WeightsS1_Pvi")


@pytest.mark.slow  # a kernel build
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


# clang-19: the AMD targets' device assembly (q4lab/amd_asm.py)

@pytest.fixture(scope="module")
def amd_assembly(tmp_path_factory) -> tuple[dict[tuple[str, str], Path], Path]:
    """({(target, source): assembly path} for every kernels/*.cu and AMD target, the cache they are in)."""
    need(amd_asm.CLANG)
    cache = tmp_path_factory.mktemp("amdcache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("Q4LAB_CACHE", str(cache))
        return amd_asm.assembly(amd_asm.AMD_TARGETS), cache


@pytest.fixture(scope="module")
def amd_kernels(amd_assembly) -> list[tuple[amd_asm.KernelResources, str]]:
    """(resources, code) of every kernel instance on every AMD target."""
    params, out = amd_asm.template_parameters(), []
    for (target, source), path in amd_assembly[0].items():
        asm = path.read_text()
        out += [(k, kernel_body(asm, k.symbol)) for k in amd_asm.parse(asm, target, source, params)]
    return out


@pytest.mark.slow
def test_clang19_compiles_every_kernel_for_the_amd_targets_calling_no_library(amd_assembly):
    """Every kernels/*.cu for gfx1100, gfx1201, gfx1151 and gfx942; no kernel calls out (s_swappc), so
    the register counts are the kernel's own and not a callee's guess (amd_asm.OCKL_SHIM)."""
    sources = sorted(f.name for f in kernels.KERNEL_DIR.glob("*.cu"))
    assert sorted(amd_assembly[0]) == sorted((t, s) for t in amd_asm.AMD_TARGETS for s in sources)
    for (target, source), path in amd_assembly[0].items():
        asm = path.read_text()
        assert f'.amdgcn_target "amdgcn-amd-amdhsa--{target}' in asm
        assert "s_swappc" not in asm, f"{source} for {target} calls a function"


@pytest.mark.slow
def test_amd_simt_reductions_keep_dpp(amd_kernels):
    """q4_warp_sum's first four steps are DPP row rotations (q4_port.h) in every fused instance, wave32 and
    wave64, never a ds_bpermute or ds_swizzle in their place."""
    fused = [(k, body) for k, body in amd_kernels if k.name.startswith("q4_gemm_kernel")]
    assert {k.target for k, _ in fused} == set(amd_asm.AMD_TARGETS)
    for k, body in fused:
        for shift in (8, 4, 2, 1):
            assert f"row_ror:{shift}" in body, (k.target, k.name, shift)


@pytest.mark.slow
def test_amd_fp16_kernels_multiply_with_dot2_where_the_target_has_it(amd_kernels):
    guard = re.search(r"#if defined\(Q4_AMD\) && \((.*?)\)\n#define Q4_DOT2_F16 1",
                      (kernels.KERNEL_DIR / "q4_port.h").read_text(), re.S).group(1)
    with_dot2 = set(re.findall(r"__(gfx\w+)__", guard))
    assert with_dot2 >= set(amd_asm.AMD_TARGETS)
    fused = [(k, body) for k, body in amd_kernels if k.name.startswith("q4_gemm_kernel")]
    for k, body in fused:
        fp16 = "DT=fp16" in k.name
        assert ("v_dot2" in body) == fp16, (k.target, k.name)


@pytest.mark.slow
def test_amd_waves_per_simd_match_the_compilers_own(amd_kernels):
    """amd_asm's register-file and LDS tables give every instance the occupancy LLVM itself noted."""
    for k, _ in amd_kernels:
        assert amd_asm.waves_per_simd(k)[0] == k.compiler_occupancy, (k.target, k.name, k.vgprs)


@pytest.mark.slow
def test_amd_spills_are_only_the_launch_bounded_gfx942_instances(amd_kernels):
    """No instance spills on the RDNA targets. On gfx942 the MT=1 instances' launch bounds (4 blocks a CU,
    q4_gemm.cu) hold them to 512 / 4 = 128 VGPRs, and those that need more spill to scratch; every other
    instance fits (some keep values in AGPRs, no scratch)."""
    for k, _ in amd_kernels:
        if k.target != "gfx942":
            assert (k.vgpr_spills, k.sgpr_spills, k.scratch_bytes) == (0, 0, 0), (k.target, k.name)
    spilled = [k for k, _ in amd_kernels if k.target == "gfx942" and k.scratch_bytes]
    assert spilled, "gfx942 no longer spills: update this test and README's Kernels section"
    for k in spilled:
        assert k.vgprs == 128 and "MT=1," in k.name, (k.name, k.vgprs)


@pytest.mark.slow
def test_amd_mma_kernel_is_a_trapping_stub_without_matrix_instructions(amd_kernels):
    """kernels/q4_mma.cu has no AMD form yet: on every AMD target each instance is `__builtin_trap()` and
    no WMMA (gfx11/gfx12) or MFMA (gfx9) instruction is there (q4_mma_supported() refuses the launch).
    Flip this once an AMD form exists: its assembly must then hold v_wmma_ (gfx1100, gfx1151, gfx1201) or
    v_mfma_ (gfx942) in every instance."""
    mma = [(k, body) for k, body in amd_kernels if k.source == "q4_mma.cu"]
    assert {k.target for k, _ in mma} == set(amd_asm.AMD_TARGETS)
    for k, body in mma:
        assert "s_trap" in body, (k.target, k.name)
        assert "v_wmma_" not in body and "v_mfma_" not in body, (k.target, k.name)


@pytest.mark.slow
def test_cli_resources_prints_one_row_per_kernel_instance(amd_assembly):
    paths, cache = amd_assembly
    result = subprocess.run([sys.executable, "-m", "q4lab", "resources", "--arch", "gfx1201,gfx942"],
                            capture_output=True, text=True, env={**os.environ, "Q4LAB_CACHE": str(cache)})
    assert result.returncode == 0, result.stderr
    tables = dict(re.findall(r"^## (gfx\w+): .*\n\n((?:\|.*\n)+)", result.stdout, re.M))
    assert sorted(tables) == ["gfx1201", "gfx942"]
    for target, text in tables.items():
        header, _, *rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()]
        assert header == list(amd_asm.TABLE_COLUMNS)
        kernels_in_asm = sum(p.read_text().count(".amdhsa_kernel ") for (t, _), p in paths.items() if t == target)
        assert len(rows) == kernels_in_asm and len({r[0] for r in rows}) == len(rows)
        max_waves = amd_asm.ARCHS[target].max_waves_per_simd
        for row in rows:
            *counts, waves = map(int, row[1:9])  # VGPRs .. SGPR spills are whole numbers
            assert min(counts) >= 0 and 1 <= waves <= max_waves and row[9] in ("vgprs", "sgprs", "lds", "max")
        names = {r[0] for r in rows}
        assert {"q4_gemm_kernel<DT=bf16,R=4,MT=8,NESTED=0,INTERLEAVED=1>", "q4_mma_kernel<DT=bf16,MT8=4,SHARED_ACT=1,NESTED=1>",
                "q4_dequant_kernel<DT=fp16,NESTED=0>"} <= names


def test_amd_waves_per_simd_take_the_tightest_limit():
    """VGPRs in allocation blocks, gfx9's shared SGPR file, and LDS shared by a CU's/WGP's SIMDs."""
    k = amd_asm.KernelResources(target="gfx942", source="x.cu", symbol="k", name="k", vgprs=100, agprs=0,
                                sgprs=30, lds_bytes=0, scratch_bytes=0, vgpr_spills=0, sgpr_spills=0, wave_size=64,
                                block_threads=256, compiler_occupancy=0)
    assert amd_asm.waves_per_simd(k) == (4, "vgprs")  # 100 -> 104 registers, 512 // 104
    assert amd_asm.waves_per_simd(dataclasses.replace(k, vgprs=8)) == (8, "max")
    assert amd_asm.waves_per_simd(dataclasses.replace(k, vgprs=8, sgprs=102)) == (7, "sgprs")
    # 20 KiB a block: 3 blocks of 4 waves on a 64 KiB CU of 4 SIMDs
    assert amd_asm.waves_per_simd(dataclasses.replace(k, vgprs=8, lds_bytes=20 * 1024)) == (3, "lds")
    rdna = dataclasses.replace(k, target="gfx1201", wave_size=32, block_threads=128, sgprs=102)
    assert amd_asm.waves_per_simd(rdna) == (12, "vgprs")  # 100 -> 120 registers, 1536 // 120; SGPRs a wave's own


def test_amd_resources_without_clang_or_with_an_unknown_target_say_what_to_do(monkeypatch):
    with pytest.raises(kernels.KernelError, match="unknown AMD target gfx906: use gfx1100"):
        amd_asm.assembly(("gfx906",))
    monkeypatch.setattr(amd_asm.shutil, "which", lambda name: None)
    with pytest.raises(kernels.KernelError, match="apt-get install clang-19 libamdhip64-dev"):
        amd_asm.assembly(("gfx1201",))


def mma_config(lib, N, M, K, sms=132, blocks=0, blocks_per_sm=1):
    got, m_tile = ctypes.c_int(blocks), ctypes.c_int(0)
    err = lib.q4_mma_config(N, M, K, sms, blocks_per_sm, ctypes.byref(got), ctypes.byref(m_tile))
    return err, got.value, m_tile.value


def mma_scratch(lib, N, M, blocks):
    floats, tickets = ctypes.c_long(0), ctypes.c_int(0)
    err = lib.q4_mma_scratch(N, M, blocks, ctypes.byref(floats), ctypes.byref(tickets))
    return err, floats.value, tickets.value


@pytest.mark.slow  # a kernel build
def test_mma_launch_fills_every_sm_unless_warps_would_get_under_four_k_tiles(cuda_library):
    lib = kernels.open_library(cuda_library)
    # batch tile: the smallest of 8/16/32/64 rows that holds M
    assert [mma_config(lib, 4096, M, 4096)[2] for M in (1, 8, 9, 16, 17, 33, 64, 200)] == [8, 8, 16, 16, 32, 64, 64, 64]
    # large shapes: one resident block an SM, however many
    assert mma_config(lib, 128256, 1, 4096)[1:] == (132, 8)
    assert mma_config(lib, 28672, 16, 8192, blocks_per_sm=2)[1] == 264
    # 1024 x 4096 at M=1: 64 items of 16 rows x 64 K tiles = 4096 pairs, 4 a warp: 64 blocks of 16 warps
    assert mma_config(lib, 1024, 1, 4096)[1] == 64
    assert mma_config(lib, 64, 1, 64)[1] == 1
    # 2..32 rows: a block's 16 warps are one team on 16 row tiles, so 63 row tiles make 4 team items, 4 x 64
    # pairs, 4 a block: 64 blocks where 63 one-warp teams' pairs made 63
    assert mma_config(lib, 1000, 2, 4096)[1] == 64 and mma_config(lib, 1000, 1, 4096)[1] == 63
    # the last team size, 32 rows (32 row tiles of 32 rows: 4 team items of 8), and the first one-warp teams
    # above it (63 row tiles of 16 rows x 64 K tiles, 4 a warp of 8)
    assert mma_config(lib, 1000, 32, 4096)[1] == 64 and mma_config(lib, 1000, 33, 4096)[1] == 126
    # forced blocks are kept; K must be whole 64-weight tiles, and the sizes positive
    assert mma_config(lib, 4096, 1, 4096, blocks=3)[:2] == (0, 3)
    assert mma_config(lib, 4096, 1, 4000)[0] != 0 and mma_config(lib, 0, 1, 64)[0] != 0
    # scratch: two item-sized fp32 slots a warp (items of 16 rows with 16 warps a block up to M=8, 32 rows up
    # to M=32, then 16, with 8 warps) and a ticket an item
    assert mma_scratch(lib, 1000, 1, 3)[1:] == (3 * 16 * 2 * 16 * 8, 63)
    assert mma_scratch(lib, 1000, 20, 2)[1:] == (2 * 8 * 2 * 32 * 32, 32)
    assert mma_scratch(lib, 1000, 200, 1)[1:] == (8 * 2 * 16 * 64, 63 * 4)
    assert mma_scratch(lib, 1000, 1, 0)[0] != 0
