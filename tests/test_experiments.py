"""`q4lab bench` and `q4lab configs`: experiments outside the shipped grid measured by the sweep (its checks,
interleaving and log) into datasets with the usual provenance."""
import subprocess
import tempfile
from pathlib import Path

import polars as pl
import pytest
import torch

from q4lab import analysis, bench, cli, dataset, kernels, launch, ops, sweep, sweep_cli

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def quick_clock(monkeypatch):
    real = bench.time_call
    monkeypatch.setattr(bench, "time_call", lambda call, **kw: real(call, **kw | dict(budget_s=0.01)))
    monkeypatch.setattr(bench, "device_gbps", lambda device: 100.0)
    monkeypatch.setattr(bench, "launch_us", lambda device: 5.0)


def test_bench_sizes_may_be_catalogue_shapes_and_families():
    from q4lab import shapes
    sizes = sweep_cli._shape_sizes("lm_head,4096x4096,llama-3-8b.q_proj")
    lm_heads = [(s.N, s.K) for s in shapes.by_family("lm_head")]
    assert sizes[:len(lm_heads)] == list(dict.fromkeys(lm_heads)) and (4096, 4096) in sizes
    assert len(sizes) == len(set(sizes))  # llama-3-8b.q_proj is 4096x4096: once
    assert set(sweep_cli._shape_sizes("all")) == {(s.N, s.K) for s in shapes.SHAPES}


def test_bench_times_every_impl_on_the_sizes_given(tmp_path, quick_clock):
    out = tmp_path / "bench.parquet"
    assert cli.main(["bench", "--shapes", "96x128,64x256", "--m", "1,3", "--dtypes", "fp32", "--impls",
                     "reference,dense", "--rounds", "1", "--out", str(out), "--no-progress"]) == 0
    frame = dataset.load(out)
    assert set(frame["sweep"]) == {"bench"} and set(frame["family"]) == {"bench"}
    assert set(frame["shape"]) == {"n96_k128", "n64_k256"} and frame.height == 2 * 2 * 2
    assert (frame["git_commit"].str.len_chars() > 0).all() and frame["run_id"].n_unique() == 1


@pytest.mark.parametrize("sizes, error", [("96x128x2", "give comma-separated NxK sizes"),
                                          ("96", "give comma-separated NxK sizes"),
                                          ("96xa", "give comma-separated NxK sizes"),
                                          ("llama-3-8b.q_prj", "close matches: ['llama-3-8b.q_proj'"),
                                          ("0x128", "N and K must be positive")])
def test_bench_refuses_sizes_that_are_not_a_positive_n_by_k(tmp_path, capsys, sizes, error):
    out = tmp_path / "bench.parquet"
    try:
        rc = cli.main(["bench", "--shapes", sizes, "--out", str(out), "--no-progress"])
    except SystemExit as exit:  # argparse refuses what --shapes cannot parse
        rc = exit.code
    assert rc == 2 and error in capsys.readouterr().err and not out.exists()


def test_configs_times_each_launch_configuration_beside_the_launchers_pick(tmp_path, quick_clock, monkeypatch,
                                                                           capsys):
    # simt stands in as the dense impl, each fixed configuration as the reference: a CPU has no kernel
    fixed = []
    monkeypatch.setattr(ops, "available_impls", lambda device, impls: dict.fromkeys(impls))
    monkeypatch.setattr(ops, "simt_gemm", lambda A, w, rows_per_warp, m_tile: fixed.append((rows_per_warp, m_tile))
                        or ops.gemm_4bit(A, w, impl="reference"))
    real = ops.gemm_4bit
    monkeypatch.setattr(ops, "gemm_4bit", lambda A, w, bias=None, impl="reference", out=None:
                        real(A, w, bias, "dense" if impl == "simt" else impl, out))
    out = tmp_path / "configs.parquet"
    assert cli.main(["configs", "--n", "96", "--k", "128", "--m", "2", "--dtypes", "fp32", "--rounds", "1",
                     "--out", str(out), "--no-progress"]) == 0
    frame = dataset.load(out)
    assert set(frame["sweep"]) == {"configs"} and set(frame["family"]) == {"configs"}
    assert set(frame["shape"]) == {"n96_k128"}
    assert sorted(frame["impl"]) == sorted(["simt", *launch.CONFIG_IMPLS])
    assert set(fixed) == set(launch.SIMT_CONFIGS)  # each configuration ran as itself
    assert "the launcher's own pick:" in capsys.readouterr().out


def test_a_configuration_impl_is_the_simt_kernel_at_that_configuration(monkeypatch):
    calls = []
    monkeypatch.setattr(ops, "simt_gemm", lambda A, w, **kw: calls.append(kw))
    sweep.impl_call("simt/r2m8", torch.zeros(1), None)()
    assert calls == [{"rows_per_warp": 2, "m_tile": 8}] and sweep.base_impl("simt/r2m8") == "simt"
    with pytest.raises(sweep.SweepError, match="unknown impl 'simt/r3m1'"):
        sweep.run_grid("llama-3-8b.q_proj", [1], ["fp16"], ["simt/r3m1"])


@pytest.mark.parametrize("path", sorted((REPO / "data" / "experiments").glob("*.parquet")), ids=lambda p: p.name)
def test_an_experiment_dataset_is_described_and_says_where_it_comes_from(path):
    frame = pl.read_parquet(path)
    assert frame.height > 0 and f"experiments/{path.name}" in (REPO / "data" / "README.md").read_text()
    for column in ("experiment", "device", "date", "kernels", "source", "recorded_in"):
        assert frame[column].null_count() == 0, column


def test_the_shipped_preset_measures_the_ms_the_analyses_read(tmp_path, monkeypatch):
    asked = []
    monkeypatch.setitem(sweep.RUNNERS, "run_grid", lambda **kw: asked.append(kw))
    monkeypatch.setattr(sweep_cli, "compact", lambda logs, out: pl.DataFrame())
    assert cli.main(["sweep", "grid", "--preset", "shipped", "--out", str(tmp_path / "g.parquet")]) == 0
    assert asked[0]["ms"] == sweep.SHIPPED_MS and max(sweep.SHIPPED_MS) == 256
    assert asked[0]["impl_max_m"] == {"gemv": 64} and asked[0]["impls"] == ",".join(sweep.TIMED_IMPLS)
    assert cli.main(["sweep", "grid", "--preset", "shipped", "--m", "1,2", "--out", str(tmp_path / "g.parquet")]) == 2
    plan = sweep._plan("grid", (sweep.Chunk((sweep.select(["llama-3-8b.q_proj"])[0],), "nf4"),), [1, 64, 128],
                       ["fp16"], ["simt", "gemv"], 64, False, True, {"gemv": 64})
    points = plan.points(plan.chunks[0], plan.impls)
    assert sorted((p.impl, p.M) for p in points) == [("gemv", 1), ("gemv", 64), ("simt", 1), ("simt", 64), ("simt", 128)]


@pytest.mark.parametrize("given, refused", [
    (["--shapes", "square"], "--shapes"), (["--m", "1,2"], "--m"), (["--dtypes", "fp16"], "--dtypes"),
    (["--impls", "simt"], "--impls"), (["--quant-types", "fp4"], "--quant-types"), (["--repeat"], "--repeat"),
    (["--dtypes", "fp16", "--repeat"], "--dtypes, --repeat"), (["--dtypes", "fp16,bf16,fp32"], None),
    (["--impls", "all"], None)])
def test_the_shipped_preset_refuses_exactly_the_grid_options_changed(tmp_path, monkeypatch, capsys, given, refused):
    asked = []
    monkeypatch.setitem(sweep.RUNNERS, "run_grid", lambda **kw: asked.append(kw))
    monkeypatch.setattr(sweep_cli, "compact", lambda logs, out: pl.DataFrame())
    rc = cli.main(["sweep", "grid", "--preset", "shipped", *given, "--out", str(tmp_path / "g.parquet")])
    if refused:
        assert rc == 2 and not asked and f"leave out {refused} (or the preset)" in capsys.readouterr().err
    else:  # a default given in full changes nothing
        assert rc == 0 and asked[0]["ms"] == sweep.SHIPPED_MS


# --- every kernel an experiment timed can be rebuilt -------------------------------------------------------
VARIANTS = REPO / "data" / "experiments" / "variants"
HASH = r"^[0-9a-f]{16}$"
# Variants whose sources were not kept before patches were (data/README.md names them): no new ones
SOURCES_LOST = {"07ef145029b27a3f", "1bdd22994cfb4806", "4f8a0ad534f7196f", "d9043db05097ae92", "ff2cbe324025f680"}


def _git(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, check=True, **kw)


def _kernels_at(commit: str, into: Path) -> Path:
    """kernels/ as `commit` had it, written under `into`."""
    into.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=_git("archive", commit, "kernels").stdout, check=True)
    return into / "kernels"


@pytest.fixture(scope="module")
def history():
    """(commits that changed kernels/, every kernel hash they shipped: source and raw-byte hashes)."""
    try:
        commits = _git("log", "--format=%H", "--", "kernels", text=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("no git history here (a source tarball?): the variants are checked in a clone")
    shipped = set()
    with tempfile.TemporaryDirectory() as tmp:
        for commit in commits:
            folder = _kernels_at(commit, Path(tmp) / commit)
            shipped |= {kernels.source_hash(folder), kernels.raw_byte_hash(folder)}
    return commits, shipped


def test_every_kernel_hash_an_experiment_timed_was_shipped_or_has_a_patch(history):
    timed = set(pl.concat(pl.read_parquet(path, columns=["kernels"]) for path in (REPO / "data" / "experiments").glob("*.parquet"))
                .filter(pl.col("kernels").str.contains(HASH))["kernels"])
    patched = {p.stem for p in VARIANTS.glob("*.patch")}
    assert timed - history[1] - patched == SOURCES_LOST, (
        "an experiment timed kernels that are neither shipped nor kept: bash scripts/variant_patch.sh BASE DIR WHAT")


@pytest.mark.parametrize("patch", sorted(VARIANTS.glob("*.patch")), ids=lambda p: p.stem)
def test_a_variant_patch_on_its_base_rebuilds_the_kernels_it_names(patch, history, tmp_path):
    what, base = patch.read_text().splitlines()[:2]
    assert what.startswith(f"kernel variant {patch.stem}: ") and base.startswith("base: ")
    base = base.removeprefix("base: ")
    assert base in history[0], f"{patch.name}: its base {base} is not a commit that changed kernels/"
    folder = _kernels_at(base, tmp_path)
    subprocess.run(["git", "apply", str(patch)], cwd=tmp_path, check=True, capture_output=True)
    assert kernels.source_hash(folder) == patch.stem


# --- a variant of kernels/ timed beside it -------------------------------------------------------------------
@pytest.fixture
def variant(tmp_path, monkeypatch):
    """A copy of kernels/ with one change the compiler reads (never built here: no GPU), and Q4LAB_VARIANTS
    restored after the test."""
    folder = tmp_path / "k_variant"
    folder.mkdir()
    for source in kernels.sources():
        (folder / source.name).write_text(source.read_text())
    with (folder / "q4_launch.h").open("a") as f:
        f.write("\nconstexpr int Q4_VARIANT_MARK = 1;\n")
    monkeypatch.setenv("Q4LAB_VARIANTS", "")
    return folder


def test_bench_times_a_variant_beside_the_shipped_kernels_in_the_same_rounds(variant, tmp_path, quick_clock,
                                                                            monkeypatch, capsys):
    """simt stands in as the reference on a CPU; each of its calls notes which kernels folder is active."""
    active = []
    monkeypatch.setattr(ops, "available_impls", lambda device, impls: dict.fromkeys(impls))
    real = ops.gemm_4bit

    def gemm(A, w, bias=None, impl="reference", out=None):
        if impl == "simt":
            active.append(kernels.active_dir())
        return real(A, w, bias, "reference" if impl == "simt" else impl, out)

    monkeypatch.setattr(ops, "gemm_4bit", gemm)
    out = tmp_path / "ab.parquet"
    assert cli.main(["bench", "--shapes", "96x128", "--m", "1,3", "--dtypes", "fp32", "--impls", "simt,dense",
                     "--kernels", str(variant), "--rounds", "2", "--out", str(out), "--no-progress"]) == 0
    h = kernels.source_hash(variant)
    printed = capsys.readouterr().out
    assert h != kernels.source_hash() and f"variant {h}: {variant.resolve()}" in printed
    frame = dataset.load(out)
    ratios = analysis.variant_ratios(frame)
    assert ratios.height == 2 and set(ratios["variant"]) == {h} and set(ratios["impl"]) == {"simt"}
    simt = frame.filter(pl.col("impl") == "simt").sort("M")["time_us"]
    on_variant = frame.filter(pl.col("impl") == f"simt@{h}").sort("M")["time_us"]
    assert ratios.sort("M")["ratio"].to_list() == pytest.approx((on_variant / simt).to_list())
    assert printed.splitlines()[-1].startswith("└") and "variant_time_us" in printed  # the A/B table comes last
    assert sorted(frame["impl"].unique()) == ["dense", "simt", f"simt@{h}"]
    assert frame.group_by("impl").len()["len"].to_list() == [2, 2, 2]  # every impl at every M
    assert set(frame["kernel_hash"]) == {kernels.source_hash()} and frame["run_id"].n_unique() == 1
    assert set(active) == {kernels.KERNEL_DIR, variant.resolve()}
    assert kernels.active_dir() == kernels.KERNEL_DIR  # the variant's calls leave kernels/ active
    assert sweep.base_impl(f"mma@{h}") == "mma"


@pytest.mark.parametrize("change, impls, error", [
    ("same", "simt", "the same sources as"),
    ("empty", "simt", "no kernel sources (*.cu) there"),
    ("changed", "dense,reference", "--impls dense,reference names none of them"),
])
def test_bench_refuses_a_variant_it_cannot_time_saying_why(variant, tmp_path, capsys, change, impls, error):
    if change == "same":  # comments aside, kernels/ itself
        (variant / "q4_launch.h").write_text((kernels.KERNEL_DIR / "q4_launch.h").read_text() + "\n// a note\n")
    elif change == "empty":
        for source in variant.iterdir():
            source.unlink()
    out = tmp_path / "ab.parquet"
    assert cli.main(["bench", "--shapes", "96x128", "--impls", impls, "--kernels", str(variant), "--out", str(out),
                     "--no-progress"]) == 2
    assert error in capsys.readouterr().err and not out.exists()


def test_a_variant_impl_needs_its_folder_named(variant, monkeypatch):
    with pytest.raises(sweep.SweepError, match="unknown impl 'mma@0123456789abcdef'"):
        sweep.grid_plan("llama-3-8b.q_proj", [1], ["fp16"], ["mma@0123456789abcdef"])
    monkeypatch.setenv("Q4LAB_VARIANTS", str(variant))
    plan = sweep.grid_plan("llama-3-8b.q_proj", [1], ["fp16"], [f"mma@{kernels.source_hash(variant)}"])
    assert plan.impls == (f"mma@{kernels.source_hash(variant)}",)


@pytest.mark.gpu
@pytest.mark.slow  # a kernel build
def test_on_a_gpu_a_variant_library_is_built_checked_and_timed_beside_kernels(variant, tmp_path):
    """The variant differs from kernels/ by a constant nothing reads: its impls pass the reference check and
    time as the shipped ones do, on their own library."""
    out = tmp_path / "ab.parquet"
    impls = "simt,mma" if torch.cuda.get_device_capability() >= (8, 0) and not torch.version.hip else "simt"
    assert cli.main(["bench", "--shapes", "4096x4096", "--m", "1,8", "--dtypes", "bf16", "--impls", impls,
                     "--kernels", str(variant), "--out", str(out), "--no-progress"]) == 0
    h = kernels.source_hash(variant)
    assert kernels.library_for(variant.resolve()).q4_source_hash().decode() == h
    ratios = analysis.variant_ratios(dataset.load(out))
    assert sorted(set(ratios["impl"])) == sorted(impls.split(",")) and ratios.height == 2 * len(impls.split(","))
    assert ratios["ratio"].is_between(0.8, 1.25).all(), ratios  # the same machine code, timed in the same rounds
