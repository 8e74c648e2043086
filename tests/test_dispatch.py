"""Dispatch rules on synthetic data with a planted answer: the best impl depends on N (simt wins to M=32
on narrow weights and to M=4 on wide ones), so only the shape-aware rule can be right everywhere."""
from __future__ import annotations

import polars as pl
import pytest

from q4lab import dispatch, synthetic

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


def test_single_is_one_step_function_per_arch_and_per_dtype_one_per_dtype(planted):
    single = dispatch.fit(planted, kind="single")
    assert set(single.trees) == {("sm_90", "*", "*"), ("gfx1201", "*", "*")}
    assert single.choose(2048, 2048, 1, "fp16", "gfx1201") == single.choose(2048, 2048, 1, "bf16", "gfx1201")
    per_dtype = dispatch.fit(planted, kind="per_dtype")
    assert set(per_dtype.trees) == {(a, d, "nf4") for a in ("sm_90", "gfx1201") for d in ("fp16", "bf16")}
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
