"""Dispatch rules on synthetic data with a planted answer: the best impl depends on N (simt wins to M=32
on narrow weights and to M=4 on wide ones), so only the shape-aware rule can be right everywhere."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from q4lab import dataset, dispatch, formats, ops, shapes, synthetic

REPO = Path(__file__).resolve().parent.parent

NARROW_N = 4096  # weights up to this N: simt wins to M=32 (M* = 40); wider: to M=4 (M* = 6)


@pytest.fixture(scope="module")
def planted():
    crossovers = {(d, name): 40 if N <= NARROW_N else 6 for d in synthetic.DEVICES for name, N, _, _ in synthetic.SHAPES}
    return synthetic.synthetic_dataset(crossovers=crossovers, floors={}, wave_tails=set(), unstable=set(), nsweep=None)


@pytest.fixture(scope="module")
def h100(planted):
    return planted.filter(pl.col("arch") == "sm_90")


def test_the_shape_rule_finds_the_planted_split(h100):
    rule = dispatch.fit(h100, impls=["simt", "dequant_blas"], kind="shape")
    assert rule.impls == ["simt", "dequant_blas"]
    for dtype in ("fp16", "bf16"):
        tree = rule.tree("sm_90", dtype)
        assert tree["feature"] == "N" and NARROW_N <= tree["threshold"] < 6144  # between the planted groups
        assert tree["le"] == {"steps": [[32, "simt"], [None, "dequant_blas"]]}
        assert tree["gt"] == {"steps": [[4, "simt"], [None, "dequant_blas"]]}
        assert rule.choose(2048, 4096, 32, dtype, "sm_90") == "simt"
        assert rule.choose(14336, 4096, 32, dtype, "sm_90") == "dequant_blas"
        assert rule.choose(14336, 4096, 4, dtype, "sm_90") == "simt"


def test_held_out_the_shape_rule_is_near_best_and_beats_one_threshold(h100):
    cv = {r["kind"]: r for r in dispatch.cross_validate(h100, folds="family").iter_rows(named=True)}
    assert set(cv) == set(dispatch.RULE_KINDS)
    assert cv["shape"]["median"] <= 1.05 and cv["shape"]["n_points"] == h100.filter(pl.col("impl") == "simt").height
    assert cv["shape"]["mean"] < cv["single"]["mean"] and cv["shape"]["p95"] < cv["single"]["p95"]
    assert cv["shape"]["worst"] < cv["single"]["worst"]


def test_the_table_rule_gives_every_measured_shape_its_own_steps(h100):
    """Fully grown: in sample every point gets its best impl (up to a step function's segments), and held
    out a shape takes its region's leaf, no worse than the depth-limited tree here."""
    rule = dispatch.fit(h100, kind="table")
    scored = dispatch.regret(rule, h100)
    assert scored["regret"].median() == 1.0 and scored["regret"].max() <= 1.05
    shape_rule = dispatch.fit(h100, kind="shape")
    assert len(list(dispatch._leaves(rule.tree("sm_90", "fp16")))) > len(list(dispatch._leaves(shape_rule.tree("sm_90", "fp16"))))
    cv = {r["kind"]: r for r in dispatch.cross_validate(h100, kinds=("shape", "table"), folds="family").iter_rows(named=True)}
    assert cv["table"]["median"] <= 1.05 and cv["table"]["p95"] <= cv["shape"]["p95"] + 0.02


def test_auto_rows_are_the_measured_rows_of_the_rules_pick(h100):
    rule = dispatch.fit(h100, kind="table")
    auto = dispatch.auto_rows(h100, rule)
    grid = h100.filter(pl.col("sweep") == "grid")
    assert set(auto["impl"]) == {"auto"} and auto.height == grid.filter(pl.col("impl") == "simt").height
    for row in auto.sample(20, seed=0).iter_rows(named=True):
        pick = rule.choose(row["N"], row["K"], row["M"], row["dtype"], row["arch"], row["quant_type"])
        measured = grid.filter(pl.col("shape") == row["shape"], pl.col("M") == row["M"], pl.col("dtype") == row["dtype"],
                               pl.col("impl") == pick)
        assert measured["time_us"].to_list() == [row["time_us"]]
    assert dispatch.auto_rows(h100.with_columns(pl.lit("sm_80").alias("arch")), rule).height == 0  # not covered


def test_single_is_one_step_function_per_arch_and_per_dtype_one_per_dtype(planted):
    single = dispatch.fit(planted, kind="single")
    assert set(single.trees) == {("sm_90", "*", "*", "*"), ("gfx1201", "*", "*", "*")}  # one device an arch
    assert single.choose(2048, 2048, 1, "fp16", "gfx1201") == single.choose(2048, 2048, 1, "bf16", "gfx1201")
    per_dtype = dispatch.fit(planted, kind="per_dtype")
    assert set(per_dtype.trees) == {(a, "*", d, "nf4") for a in ("sm_90", "gfx1201") for d in ("fp16", "bf16")}
    assert all("steps" in tree for tree in per_dtype.trees.values())
    assert "bnb" not in single.impls and "dense" not in single.impls and "simt" in single.impls
    with pytest.raises(LookupError, match="nothing for arch 'sm_80'.*q4lab dispatch fit"):
        single.choose(2048, 2048, 1, "fp16", "sm_80")
    with pytest.raises(ValueError, match="unknown rule kind 'tree'"):
        dispatch.fit(planted, kind="tree")


def test_regret_is_chosen_over_best_per_point(h100):
    rule = dispatch.fit(h100, impls=["simt", "dequant_blas"], kind="single")
    scored = dispatch.regret(rule, h100)
    row = scored.filter(pl.col("shape") == "llama-3-8b.q_proj", pl.col("M") == 32, pl.col("dtype") == "fp16").row(0, named=True)
    times = {r["impl"]: r["time_us"] for r in h100.filter(pl.col("shape") == "llama-3-8b.q_proj", pl.col("M") == 32,
                                                          pl.col("dtype") == "fp16").iter_rows(named=True)}
    assert row["best"] == "simt" and row["chosen"] == rule.choose(4096, 4096, 32, "fp16", "sm_90")
    assert row["regret"] == pytest.approx(times[row["chosen"]] / times["simt"])
    assert scored["regret"].min() == pytest.approx(1.0) and scored["regret"].null_count() == 0


def test_a_chosen_impl_not_measured_is_left_unscored(h100):
    rule = dispatch.fit(h100, impls=["simt", "dequant_blas"], kind="per_dtype")
    rule.trees = {k: {"steps": [[1, "mma"], [None, "simt"]]} for k in rule.trees}
    rule.impls = ["mma", *rule.impls]
    scored = dispatch.regret(rule, h100)
    assert scored.filter(pl.col("M") == 1)["regret"].null_count() == scored.filter(pl.col("M") == 1).height
    summary = dispatch.summarize(scored.with_columns(pl.lit("x").alias("kind"))).row(0, named=True)
    assert summary["n_unscored"] == scored.filter(pl.col("M") == 1).height
    elsewhere = dispatch.regret(rule, h100.with_columns(pl.lit("sm_80").alias("arch")))  # an arch it lacks
    assert elsewhere["chosen"].null_count() == elsewhere["regret"].null_count() == elsewhere.height


def test_transfer_scores_each_device_with_the_others_rule():
    frame = synthetic.synthetic_dataset(nsweep=None)  # gfx1201's planted crossovers are 0.75x the H100's
    table = dispatch.transfer(frame, kinds=["per_dtype"])
    assert table.height == 4  # 2 devices fitted on x 2 scored on
    for target in frame["device"].unique():
        scored = table.filter(pl.col("scored_on") == target)
        own, other = (scored.filter((pl.col("fitted_on") == target) == same)["mean"][0] for same in (True, False))
        assert own < other  # in-sample, each device's own fit is the least regret on its points


def test_json_round_trip_keeps_choices_and_provenance(planted, tmp_path):
    rule = dispatch.fit(planted, kind="shape", datasets=["data/synthetic.parquet"])
    path = tmp_path / "rule.json"
    path.write_text(rule.to_json())
    back = dispatch.load_rule(path)
    assert back == rule and back.provenance["datasets"] == ["synthetic.parquet"]
    assert back.provenance["kernel_hash"] == ["synthetic"] and back.kind == "shape"
    path.write_text("{\"kind\": \"shape\"}")
    with pytest.raises(ValueError, match="not a dispatch rule.*q4lab dispatch fit"):
        dispatch.load_rule(path)
    with pytest.raises(FileNotFoundError, match="q4lab dispatch fit"):
        dispatch.load_rule(tmp_path / "missing.json")


# ---------------------------------------------------------------------------------------------------------
# impl="auto" follows a rule: the shipped one, or the one Q4LAB_DISPATCH names
def _write_rule(tmp_path, arch, steps, impls):
    rule = dispatch.Rule("per_dtype", impls, {(arch, "*", "*", "*"): {"steps": steps}})
    path = tmp_path / "rule.json"
    path.write_text(rule.to_json())
    return path


def test_the_shipped_rule_is_the_fit_of_the_shipped_data():
    files = dataset.resolve(str(REPO / "data" / "*.parquet"))
    shipped = dispatch.load_rule()
    refit = dispatch.fit(dataset.load(files), kind=shipped.kind, datasets=files)
    assert shipped == refit, ("q4lab/dispatch_rule.json is not the fit of data/*.parquet: refit it with "
                              "`q4lab dispatch fit data/*.parquet --out q4lab/dispatch_rule.json` (data/README.md)")


@pytest.mark.parametrize("card", ["NVIDIA H200", "NVIDIA H100 PCIe"])  # measured: its own trees; not: sm_90's
def test_auto_follows_the_shipped_rule_where_its_impls_run(monkeypatch, card):
    shipped = dispatch.load_rule()
    monkeypatch.setattr(ops, "_available", {})
    monkeypatch.setattr(ops, "available_impls", lambda device, impls: dict.fromkeys(impls))
    monkeypatch.setattr(ops, "device_arch", lambda device: "sm_90")
    monkeypatch.setattr(ops, "device_name", lambda device: card)
    monkeypatch.delenv("Q4LAB_DISPATCH", raising=False)
    assert any(key[1] == card for key in shipped.trees) == (card in shipped.provenance["device"])
    for name in ("fp16", "bf16", "fp32"):  # its own trees where it has them, else the arch's
        own = shipped.trees.get(("sm_90", card, name, "nf4"), shipped.trees[("sm_90", "*", name, "nf4")])
        assert shipped.tree("sm_90", name, "nf4", card) is own
    chosen = set()
    for shape in shapes.SHAPES:
        for M in (1, 4, 12, 16, 24, 48, 64, 128, 1024):
            for dtype, name in ((torch.float16, "fp16"), (torch.bfloat16, "bf16"), (torch.float32, "fp32")):
                impl = ops.auto_impl(shape.N, shape.K, M, dtype, "cuda")
                assert impl == shipped.choose(shape.N, shape.K, M, name, "sm_90", "nf4", card)
                chosen.add(impl)
    assert {"simt", "dequant_blas"} <= chosen


def test_auto_falls_back_to_the_defaults_without_a_rule_or_an_impl(monkeypatch, tmp_path):
    monkeypatch.setattr(ops, "_available", {})
    monkeypatch.setattr(ops, "device_arch", lambda device: "sm_80")  # an arch the shipped rule lacks
    monkeypatch.setattr(ops, "device_name", lambda device: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(ops, "available_impls", lambda device, impls: dict.fromkeys(impls))
    limit = ops.AUTO_SIMT_MAX_M["fp16"]
    assert ops.auto_impl(4096, 4096, limit, torch.float16, "cuda") == "simt"
    assert ops.auto_impl(4096, 4096, limit + 1, torch.float16, "cuda") == "dequant_blas"
    # a rule picking an impl the device cannot run (a tensor-core impl on AMD): the defaults again
    monkeypatch.setattr(ops, "_available", {})
    monkeypatch.setattr(ops, "available_impls", lambda device, impls: {
        impl: "needs an NVIDIA GPU" if impl == "mma" else None for impl in impls})
    monkeypatch.setenv("Q4LAB_DISPATCH", str(_write_rule(tmp_path, "sm_80", [[None, "mma"]], ["mma"])))
    assert ops.auto_impl(4096, 4096, 1, torch.float16, "cuda") == "simt"
    monkeypatch.setattr(ops, "_available", {})
    monkeypatch.setattr(ops, "available_impls", lambda device, impls: {"mma": "needs an NVIDIA GPU"})
    assert ops.auto_impl(4096, 4096, limit + 1, torch.float16, "cuda") == "dequant_blas"
    # ... or one that runs here but cannot take this weight (mma needs blocksize >= 64)
    monkeypatch.setattr(ops, "_available", {})
    monkeypatch.setattr(ops, "available_impls", lambda device, impls: dict.fromkeys(impls))
    assert ops.auto_impl(4096, 4096, 1, torch.float16, "cuda", blocksize=64) == "mma"
    assert ops.auto_impl(4096, 4096, 1, torch.float16, "cuda", blocksize=32) == "simt"


def test_q4lab_dispatch_overrides_the_shipped_rule_in_gemm_4bit(monkeypatch, tmp_path):
    """On the CPU, a rule for this machine's arch that picks reference to M=2 and dense above: auto's output
    is bit for bit the output of the impl the rule names."""
    monkeypatch.setattr(ops, "_available", {})
    path = _write_rule(tmp_path, ops.device_arch(torch.device("cpu")), [[2, "reference"], [None, "dense"]],
                       ["reference", "dense"])
    torch.manual_seed(0)
    w = formats.quantize(torch.randn(48, 128), "nf4", 64, False)
    A1, A4 = torch.randn(1, 128), torch.randn(4, 128)
    monkeypatch.delenv("Q4LAB_DISPATCH", raising=False)
    assert torch.equal(ops.gemm_4bit(A4, w, impl="auto"), ops.gemm_4bit(A4, w, impl="dequant_blas"))  # the default
    monkeypatch.setenv("Q4LAB_DISPATCH", str(path))
    assert torch.equal(ops.gemm_4bit(A1, w, impl="auto"), ops.gemm_4bit(A1, w, impl="reference"))
    assert torch.equal(ops.gemm_4bit(A4, w, impl="auto"), ops.gemm_4bit(A4, w, impl="dense"))
    assert not torch.equal(ops.gemm_4bit(A4, w, impl="dense"), ops.gemm_4bit(A4, w, impl="reference"))


@pytest.mark.gpu
def test_auto_on_the_gpu_runs_what_the_shipped_rule_picks(monkeypatch):
    monkeypatch.delenv("Q4LAB_DISPATCH", raising=False)
    shipped, arch, card = dispatch.load_rule(), ops.device_arch(torch.device("cuda")), ops.device_name(torch.device("cuda"))
    torch.manual_seed(0)
    w = formats.quantize(torch.randn(4096, 4096, device="cuda", dtype=torch.float16), "nf4", 64, False)
    ran = set()
    for M in (1, 8, 64, 512):
        try:
            chosen = shipped.choose(w.N, w.K, M, "fp16", arch, "nf4", card)
        except LookupError:
            pytest.skip(f"the shipped rule has no {arch} entry (it covers {sorted(shipped.trees)})")
        assert ops.auto_impl(w.N, w.K, M, torch.float16, "cuda") == chosen
        A = torch.randn(M, w.K, device="cuda", dtype=torch.float16)
        assert torch.equal(ops.gemm_4bit(A, w, impl="auto"), ops.gemm_4bit(A, w, impl=chosen))
        ran.add(chosen)
    assert len(ran) >= 2  # small and large M dispatch to different impls


# ---------------------------------------------------------------------------------------------------------
def test_the_rule_table_names_each_region_and_its_impls(h100):
    table = dispatch.rule_table(dispatch.fit(h100, impls=["simt", "dequant_blas"], kind="shape"))
    fp16 = table.filter(pl.col("dtype") == "fp16")
    assert fp16["impl by M"].to_list() == ["simt to M=32, dequant_blas above", "simt to M=4, dequant_blas above"]
    assert fp16["shapes"][0].startswith("N <= ") and fp16["shapes"][1].startswith("N > ")


def test_rollup_sums_the_model_weights_with_log_log_interpolation(h100):
    rule = dispatch.fit(h100, impls=["simt", "dequant_blas"], kind="shape")
    fp16 = h100.filter(pl.col("dtype") == "fp16")
    roll = dispatch.rollup(fp16, rule, "llama-3-70b", ms=(2, 3, 4096))
    layers = shapes.model_layers("llama-3-70b")

    def time(impl, shape, M):
        return fp16.filter(pl.col("impl") == impl, pl.col("shape") == shape.name, pl.col("M") == M)["time_us"][0]

    def step(impl, M):
        return roll.filter(pl.col("impl") == impl, pl.col("M") == M).row(0, named=True)

    assert step("simt", 2)["step_us"] == pytest.approx(sum(c * time("simt", s, 2) for s, c in layers))
    assert not step("simt", 2)["interpolated"] and step("simt", 3)["interpolated"]
    w = math.log(3 / 2) / math.log(4 / 2)  # M=3 lies this far from 2 to 4 in log M
    expected = sum(c * time("dense", s, 2) ** (1 - w) * time("dense", s, 4) ** w for s, c in layers)
    assert step("dense", 3)["step_us"] == pytest.approx(expected)
    auto = sum(c * time(rule.choose(s.N, s.K, 2, "fp16", "sm_90"), s, 2) for s, c in layers)
    assert step("auto", 2)["step_us"] == pytest.approx(auto)
    assert step("best", 2)["step_us"] <= step("auto", 2)["step_us"]
    assert step("auto", 2)["speedup_vs_dense"] == pytest.approx(step("dense", 2)["step_us"] / auto)
    assert step("auto", 4096)["step_us"] is None  # beyond the largest measured M: no extrapolation
    with pytest.raises(ValueError, match=r"llama-3-8b.*\['llama-3-8b.lm_head'\] missing"):
        dispatch.rollup(fp16, rule, "llama-3-8b")
    with pytest.raises(ValueError, match=r"\(bnb, dense\) none is one the rule picks among \(simt, dequant_blas\); "
                                         r"measure one: q4lab sweep grid --shapes llama-3-70b.*--impls simt,dequant_blas"):
        dispatch.rollup(fp16.filter(pl.col("impl").is_in(["dense", "bnb"])), rule, "llama-3-70b")


@pytest.mark.parametrize("rule_impls, candidates", [(["simt", "dequant_blas"], ["dequant_blas", "gemv", "simt"]),
                                                    (["simt", "dense"], ["dense", "dequant_blas", "gemv", "simt"])])
def test_regret_and_rollup_take_the_best_among_the_same_candidates(h100, rule_impls, candidates):
    """dense, fastest on this data from M=4, is a candidate only for a rule over it; bnb, for neither."""
    fp16 = h100.filter(pl.col("dtype") == "fp16")
    rule = dispatch.fit(fp16, impls=rule_impls, kind="per_dtype")
    assert dispatch.candidates(rule, sorted(fp16["impl"].unique())) == candidates
    best = set(dispatch.regret(rule, fp16)["best"])
    roll = dispatch.rollup(fp16, rule, "llama-3-70b", ms=(1, 64)).filter(pl.col("impl") == "best")
    rolled = set(", ".join(roll["picks"]).split(", "))
    assert best <= set(candidates) and rolled <= set(candidates)
    assert ("dense" in best) == ("dense" in rolled) == ("dense" in rule_impls)

def test_dispatch_fit_command_writes_a_rule_naming_its_data(planted, tmp_path, capsys):
    from q4lab import cli

    data = tmp_path / "planted.parquet"
    planted.write_parquet(data)
    out = tmp_path / "rule.json"
    assert cli.main(["dispatch", "fit", str(data), "--out", str(out), "--kind", "per_dtype", "--impls", "simt,dequant_blas"]) == 0
    rule = dispatch.load_rule(out)
    assert rule == dispatch.fit(planted, ["simt", "dequant_blas"], "per_dtype", [data])
    assert rule.provenance["datasets"] == ["planted.parquet"]
    assert f"wrote {out}: per_dtype rule over simt, dequant_blas for gfx1201, sm_90" in capsys.readouterr().out
    assert cli.main(["dispatch", "fit", str(tmp_path / "none.parquet"), "--out", str(out)]) == 2
    assert "no such file" in capsys.readouterr().err and dispatch.load_rule(out) == rule  # the old rule stays


def test_a_device_that_did_not_run_an_impl_cannot_veto_it(h100):
    """Two devices of one arch that ran different impls: the H100 no gemv, an H200 no dequant_blas (and its
    gemv made twice as fast as simt from M=8 to 32). The rule picks gemv where the H200 says, and
    dequant_blas at large M where the H100 says."""
    scale = pl.when(pl.col("M").is_between(8, 32)).then(0.5).otherwise(2.0)
    h200 = h100.with_columns(pl.lit("NVIDIA H200 (synthetic)").alias("device"))
    gemv = h200.filter(pl.col("impl") == "simt").with_columns(
        pl.lit("gemv").alias("impl"), *(pl.col(c) * scale for c in ("time_us", "time_us_lo", "time_us_hi")))
    frame = pl.concat([h100.filter(pl.col("impl") != "gemv"), h200.filter(pl.col("impl") == "simt"), gemv])
    rule = dispatch.fit(frame, impls=["simt", "gemv", "dequant_blas"], kind="per_dtype")
    assert [rule.choose(4096, 4096, M, "fp16", "sm_90") for M in (1, 16, 128)] == ["simt", "gemv", "dequant_blas"]
    assert rule.provenance["device"] == ["NVIDIA H100 80GB HBM3 (synthetic)", "NVIDIA H200 (synthetic)"]


def test_a_device_without_an_impl_ranks_the_others_as_the_device_with_it_does(h100):
    """The H100 ran simt and dequant_blas; an H200 of the same arch, twice as fast, also ran gemv. Fitting
    takes the H100's missing gemv from the H200's, scaled by their ratio on simt and dequant_blas, so each
    H100 point votes as the H200 point does, not as if dequant_blas or simt were the best there."""
    h200 = h100.with_columns(pl.lit("NVIDIA H200 (synthetic)").alias("device"),
                             *(pl.col(c) * 0.5 for c in ("time_us", "time_us_lo", "time_us_hi")))
    gemv = h200.filter(pl.col("impl") == "simt").with_columns(
        pl.lit("gemv").alias("impl"), *(pl.col(c) * 0.8 for c in ("time_us", "time_us_lo", "time_us_hi")))
    frame = pl.concat([h100.filter(pl.col("impl") != "gemv"), h200.filter(pl.col("impl") != "gemv"), gemv])
    impls = ["simt", "gemv", "dequant_blas"]
    times, _ = dispatch.point_times(frame, impls)
    regrets = dispatch._regrets(times, impls)
    on = times["device"].str.contains("H100").to_numpy()
    assert on.any() and np.isfinite(times.filter(~pl.Series(on))["gemv"].to_numpy()).all()
    assert np.allclose(regrets[on], regrets[~on])  # point_times sorts both devices' points alike
    assert (regrets[on, 1] < 1e6).all() and (regrets[on] >= 1).all()


def test_disagreements_find_what_no_rule_keyed_by_arch_can_serve(h100):
    """An H200 of the H100's arch where dequant_blas takes 0.7x the H100's time at M=32, where simt wins the
    narrow shapes by less than that on the H100: there the cards' fastest impls differ, and the floor is the
    least worst regret one choice gets on both. gemv, run on the H200 alone and made its fastest on one of
    those shapes, leaves that point out: nothing is known of gemv on the H100."""
    h200 = h100.with_columns(pl.lit("NVIDIA H200 (synthetic)").alias("device"))
    narrow = sorted(h100.filter(pl.col("N") <= NARROW_N)["shape"].unique())
    assert len(narrow) >= 2
    at_32 = pl.col("M") == 32
    for where, factor in (((pl.col("impl") == "dequant_blas") & at_32, 0.7),
                          ((pl.col("impl") == "gemv") & at_32 & (pl.col("shape") == narrow[0]), 0.001)):
        h200 = h200.with_columns(pl.when(where).then(pl.col(c) * factor).otherwise(pl.col(c))
                                 for c in ("time_us", "time_us_lo", "time_us_hi"))
    frame = pl.concat([h100.filter(pl.col("impl") != "gemv"), h200])
    found = dispatch.disagreements(frame, ["simt", "gemv", "dequant_blas"])
    assert set(found["shape"]) == set(narrow[1:]) and (found["M"] == 32).all()
    times, impls = dispatch.point_times(frame, ["simt", "dequant_blas"])
    for row in found.iter_rows(named=True):
        point = times.filter(pl.col("shape") == row["shape"], pl.col("dtype") == row["dtype"], pl.col("M") == 32)
        t = point.select(impls).to_numpy()
        assert row["floor"] == pytest.approx((t / t.min(axis=1, keepdims=True)).max(axis=0).min())
        assert row["beyond"] == (row["floor"] > 1.10) and "H200 (synthetic): dequant_blas" in row["best_by_device"]
    assert found["floor"].is_sorted(descending=True)


def test_one_family_cannot_be_left_out(h100):
    with pytest.raises(ValueError, match=r"leaving one family out needs two or more; the grid holds \['mlp_up'\]"):
        dispatch.cross_validate(h100.filter(pl.col("family") == "mlp_up"))
    with pytest.raises(ValueError, match="leave out one 'family' or one 'shape'"):
        dispatch.cross_validate(h100, folds="device")


def test_the_table_rule_separates_shapes_where_no_single_split_pays():
    """Four shapes on a 2 x 2 grid of N and K, simt winning long where exactly one of them is small: a split on
    N or K alone leaves two halves as mixed as the whole, so only the splits below it pay, and the table must
    still give each shape its own steps."""
    small, large = 2048, 16384
    grid_shapes = [(f"xor.{N}x{K}", N, K, "xor") for N in (small, large) for K in (small, large)]
    crossovers = {("H100", name): 40 if (N == small) != (K == small) else 6 for name, N, K, _ in grid_shapes}
    grid = synthetic.synthetic_dataset(devices=("H100",), shapes=grid_shapes, impls=("simt", "dequant_blas"),
                                       crossovers=crossovers, floors={}, wave_tails=set(), unstable=set(), nsweep=None)
    scored = dispatch.regret(dispatch.fit(grid, kind="table"), grid)
    assert scored["regret"].max() <= 1.02


def test_each_measured_device_of_an_arch_gets_its_own_trees(h100, tmp_path):
    """The H100 and a synthetic H200 disagree at M=32 on the narrow shapes (dequant_blas 0.7x there on the
    H200): each card's own trees pick its fastest, so neither pays the other's choice; a third sm_90 card
    takes the arch's trees, fitted to both; a rule file without device trees still loads, as arch trees."""
    h200 = h100.with_columns(pl.lit("NVIDIA H200 (synthetic)").alias("device"))
    h200 = h200.with_columns(pl.when((pl.col("impl") == "dequant_blas") & (pl.col("M") == 32)).then(pl.col(c) * 0.7)
                             .otherwise(pl.col(c)) for c in ("time_us", "time_us_lo", "time_us_hi"))
    frame = pl.concat([h100, h200])
    impls = ["simt", "dequant_blas"]
    found = dispatch.disagreements(frame, impls)
    assert found.height > 0
    rule = dispatch.fit(frame, impls, kind="table")
    assert {key[1] for key in rule.trees} == {"*", *frame["device"].unique()}
    scored = dispatch.regret(rule, frame.filter(pl.col("impl").is_in(impls)))
    assert found["floor"].max() > 1.10 and scored["regret"].max() == 1.0  # one choice for both: the floor at best
    for row in found.iter_rows(named=True):
        picks = {device: rule.choose(row["N"], row["K"], 32, row["dtype"], "sm_90", "nf4", device)
                 for device in frame["device"].unique()}
        assert picks == {"NVIDIA H100 80GB HBM3 (synthetic)": "simt", "NVIDIA H200 (synthetic)": "dequant_blas"}
        other = rule.choose(row["N"], row["K"], 32, row["dtype"], "sm_90", "nf4", "NVIDIA H100 PCIe")
        assert other == rule.choose(row["N"], row["K"], 32, row["dtype"], "sm_90")
    gains = dispatch.card_trees(frame.filter(pl.col("impl").is_in(impls)), impls=impls)
    assert gains["own_worst"].to_list() == [1.0, 1.0]  # the arch's trees alone: no better than the floor somewhere
    assert gains["arch_worst"].max() >= found["floor"].max() > 1.10
    arch_only = json.loads(rule.to_json())
    arch_only["rules"] = [{k: v for k, v in r.items() if k != "device"} for r in arch_only["rules"] if r["device"] == "*"]
    (tmp_path / "old.json").write_text(json.dumps(arch_only))
    old = dispatch.load_rule(tmp_path / "old.json")
    assert set(old.trees) == {k for k in rule.trees if k[1] == "*"}
    assert dispatch.rule_table(rule).filter(pl.col("device") != "*")["device"].n_unique() == 2
