"""The analyses recover exactly what `synthetic_dataset` planted, and flag nothing else."""
import math

import numpy as np
import polars as pl
import pytest

from q4lab import analysis, dataset
from q4lab.synthetic import (DEVICES, MS, PLANTED_CROSSOVERS, PLANTED_FLOORS, PLANTED_SLOW_N,
                             PLANTED_UNSTABLE, PLANTED_UNSTABLE_N, PLANTED_WAVE_TAILS, SHAPES, NSWEEP,
                             synthetic_dataset)

KEY_OF = {spec["device"]: key for key, spec in DEVICES.items()}


@pytest.fixture(scope="module")
def df():
    return synthetic_dataset()


def test_synthetic_dataset_follows_the_schema_and_says_it_is_synthetic(df):
    dataset.validate(df)  # raises on a missing or ill-typed column
    assert all("(synthetic)" in d for d in df["device"].unique())
    assert df.filter(pl.col("sweep") == "grid", pl.col("impl") == "bnb")["vendor"].unique().to_list() == ["nvidia"]
    # gbps is bytes / time, as the sweep writes it
    assert (df["gbps"] - df["bytes"] / df["time_us"] / 1e3).abs().max() < 1e-9


def test_crossovers_recover_every_planted_crossover(df):
    got = analysis.crossovers(df)
    assert got.height == len(DEVICES) * 2 * len(SHAPES)  # devices x dtypes x shapes
    for row in got.iter_rows(named=True):
        planted = PLANTED_CROSSOVERS[(KEY_OF[row["device"]], row["shape"])]
        if planted > MS[-1]:
            assert (row["censored"], row["crossover_m"], row["crossover_label"]) == ("right", None, "> 128")
        elif planted < MS[0]:
            assert (row["censored"], row["crossover_m"], row["crossover_label"]) == ("left", None, "< 1")
        else:
            assert row["censored"] == "none" and row["n_crossings"] == 1
            assert row["crossover_m"] == pytest.approx(planted, rel=1e-9), row["shape"]
        assert row["stable"] == ((KEY_OF[row["device"]], row["shape"]) not in PLANTED_UNSTABLE)


def _summary(crossovers: dict[str, float]):
    shapes = tuple(s for s in SHAPES if s[0] in crossovers)
    frame = synthetic_dataset(devices=("H100",), shapes=shapes, dtypes=("fp16",), floors={}, wave_tails={},
                              unstable={}, nsweep=None, crossovers={("H100", s): m for s, m in crossovers.items()})
    (row,) = analysis.crossover_summary(frame).iter_rows(named=True)
    return row


def test_crossover_summary_median_of_measured_crossovers():
    row = _summary({"llama-3-8b.q_proj": 4, "llama-3-70b.q_proj": 8, "llama-3-8b.up_proj": 16,
                    "llama-3.2-1b.kv_proj": 300})
    # the right-censored shape sits above every measured M*, so the median (8 + 16) / 2 is determined
    assert row["median_m"] == pytest.approx(12.0) and row["median_label"] == "12"
    assert (row["n_shapes"], row["n_left"], row["n_right"]) == (4, 0, 1)
    assert row["q25_m"] == pytest.approx(7.0) and row["q75_m"] is None  # q75 involves the censored one
    assert row["iqr_label"] == "7 .. > 44"  # 16 + (128 - 16) / 4: at least


@pytest.mark.parametrize("planted, label", [
    ([4, 300, 300, 300], "> 128"),  # most shapes still favour simt at the largest M
    ([4, 8, 300, 300], "> 68"),     # the median lies between 8 and a censored value above 128
    ([0.5, 0.5, 0.5, 20], "< 1"),   # most shapes never favour simt
])
def test_crossover_summary_reports_censored_medians_as_bounds(planted, label):
    names = ["llama-3-8b.q_proj", "llama-3-70b.q_proj", "llama-3-8b.up_proj", "gemma-2-9b.q_proj"]
    row = _summary(dict(zip(names, planted)))
    assert row["median_m"] is None and row["median_label"] == label


def test_dispatch_threshold_is_exact_when_every_shape_crosses_between_two_measured_m():
    row = _summary({"llama-3-8b.q_proj": 20, "llama-3-70b.q_proj": 24, "llama-3-8b.up_proj": 28,
                    "gemma-2-9b.q_proj": 30})
    assert row["threshold_m"] == 16 and row["threshold_slowdown"] == pytest.approx(1.0)
    assert row["median_m"] == pytest.approx(26.0)


def test_camping_floors_label_exactly_the_planted_floors_and_wave_tails(df):
    floors = analysis.camping_floors(df)
    labelled = {(KEY_OF[r["device"]], r["shape"]): r["label"]
                for r in floors.filter(pl.col("label") != "normal").iter_rows(named=True)}
    expected = {k: "camping" for k in PLANTED_FLOORS if k not in PLANTED_UNSTABLE}
    expected |= {k: "wave_tail" for k in PLANTED_WAVE_TAILS}
    # simt never beats dequant_blas there (a left-censored crossover): far above the model from M=1 on,
    # but rising with M rather than flat
    expected[("gfx1201", "llama-3-70b.down_proj")] = "slow_not_flat"
    assert labelled == expected
    # both dtypes agree, and the floor is recovered as planted (a fixed latency: dtype-independent)
    assert floors.filter(pl.col("label") != "normal").height == 2 * len(expected)
    for row in floors.filter(pl.col("label") == "camping").iter_rows(named=True):
        floor_us, m_floor = PLANTED_FLOORS[(KEY_OF[row["device"]], row["shape"])]
        assert (row["floor_us"], row["m_floor"]) == (floor_us, m_floor)
        assert row["excess_ratio"] == pytest.approx(floor_us / row["model_us"]) and row["excess_ratio"] > 2
        assert row["z"] > 3.5 and row["z_wave"] > 3.5
    for row in floors.filter(pl.col("label") == "slow_not_flat").iter_rows(named=True):
        assert row["m_floor"] == 1 and row["z"] > 3.5 and row["excess_ratio"] > 10
    for row in floors.filter(pl.col("label") == "wave_tail").iter_rows(named=True):
        # 128 one-warp-row blocks, one on each of 128 SMs (4 warps: uncrowded) against the same work spread
        # over 132 SMs at the 5 blocks (20 warps, 20/9 crowding) that fit
        assert row["wave_slowdown"] == pytest.approx(132 * 5 * 9 / (128 * 20))
        assert row["z"] > 3.5 >= row["z_wave"]


def test_an_unstable_floor_is_never_flagged_but_listed_for_remeasurement(df):
    floors = analysis.camping_floors(df)
    (key,) = PLANTED_UNSTABLE
    rows = floors.filter(pl.col("device") == DEVICES[key[0]]["device"], pl.col("shape") == key[1])
    assert rows["label"].to_list() == ["normal", "normal"] and not rows["stable"].any()
    assert rows["z"].min() > 3.5 and rows["m_floor"].min() >= 2  # it would have been a floor
    listed = analysis.needs_remeasurement(df)
    grid = listed.filter(pl.col("sweep") == "grid")
    assert set(grid["shape"]) == {key[1]} and set(grid["impl"]) == {"simt"} and grid.height == 2 * len(MS)
    nsweep = listed.filter(pl.col("sweep") == "nsweep")
    assert sorted(nsweep["N"]) == sorted(n for ns in PLANTED_UNSTABLE_N.values() for n in ns)


def test_a_floor_counts_only_when_every_repeat_reproduces_it(df):
    key = ("gfx1201", "llama-3.2-1b.q_proj")
    repeat = df.filter(pl.col("device") == DEVICES[key[0]]["device"], pl.col("shape") == key[1],
                       pl.col("impl") == "simt", pl.col("M") == 1)
    repeat = repeat.with_columns(pl.lit("repeat").alias("sweep"), pl.lit(False).alias("stable"))
    floors = analysis.camping_floors(pl.concat([df, repeat]))
    assert floors.filter(pl.col("shape") == key[1], pl.col("device") == DEVICES[key[0]]["device"])["label"].to_list() == ["normal"] * 2


def test_no_planted_effects_means_no_flags():
    clean = synthetic_dataset(floors={}, wave_tails={}, unstable={}, slow_n={}, unstable_n={},
                              crossovers={k: max(v, 6) for k, v in PLANTED_CROSSOVERS.items()})
    assert set(analysis.camping_floors(clean)["label"]) == {"normal"}
    per_n, families = analysis.resonance(clean)
    assert not per_n["flagged"].any() and per_n["residual"].abs().max() < 0.02
    assert families["n_flagged"].sum() == 0 and analysis.strongest_family(families).is_empty()
    assert analysis.needs_remeasurement(clean).is_empty()


def test_m_inversions_find_exactly_a_planted_slow_batch_size(df):
    """The synthetic times grow with M everywhere; simt made 3x slower at M=4 on one shape of one device
    must come back as that point alone, against the larger M it is slowest against."""
    assert all(analysis.m_inversions(df, impl).is_empty() for impl in ("simt", "dequant_blas", "gemv", "dense"))
    shape, device = "llama-3-8b.up_proj", DEVICES["H100"]["device"]
    slow = (pl.col("impl") == "simt") & (pl.col("shape") == shape) & (pl.col("device") == device) & (pl.col("M") == 4)
    planted = df.with_columns(pl.when(slow).then(pl.col(c) * 3).otherwise(pl.col(c))
                              for c in ("time_us", "time_us_lo", "time_us_hi"))
    found = analysis.m_inversions(planted, "simt")
    assert found.height == planted.filter(slow & (pl.col("sweep") == "grid")).select("dtype", "quant_type").n_unique()
    points = analysis._points(planted, "simt", analysis.GRID_SWEEPS)
    for row in found.iter_rows(named=True):
        same = points.filter(pl.col("shape") == shape, pl.col("device") == device, pl.col("dtype") == row["dtype"])
        larger = same.filter(pl.col("M") > 4).sort("time_us").row(0, named=True)
        at_4 = same.filter(pl.col("M") == 4)["time_us"].item()
        assert (row["shape"], row["device"], row["M"], row["faster_m"]) == (shape, device, 4, larger["M"])
        assert row["ratio"] == pytest.approx(at_4 / larger["time_us"]) and row["ratio"] > 1.05


def test_resonance_flags_exactly_the_planted_multiples(df):
    per_n, families = analysis.resonance(df)
    sweep = range(NSWEEP["n_start"], NSWEEP["n_stop"] + 1, NSWEEP["n_step"])
    for key, (divisor, _) in PLANTED_SLOW_N.items():
        rows = per_n.filter(pl.col("device") == DEVICES[key]["device"])
        assert rows.height == len(sweep)
        assert rows.filter("flagged")["N"].to_list() == [n for n in sweep if n % divisor == 0]
        assert set(rows.filter("flagged")["family"]) == {f"mult_{divisor}"}
        unstable = rows.filter(pl.col("N").is_in(list(PLANTED_UNSTABLE_N[key])))
        assert unstable["residual"].max() < -0.2 and not unstable["flagged"].any()  # slow, yet not flagged
        assert rows.filter(~pl.col("flagged"), pl.col("stable"))["residual"].abs().max() < 0.02
    best = analysis.strongest_family(families)
    assert {KEY_OF[r["device"]]: r["family"] for r in best.iter_rows(named=True)} == \
        {key: f"mult_{d}" for key, (d, _) in PLANTED_SLOW_N.items()}
    for row in best.iter_rows(named=True):
        n_stable = len(sweep) - 1  # the unstable N is not part of the base
        assert row["n_swept"] == n_stable and row["flagged_share"] == 1.0 and row["hit_rate"] == 1.0
        assert row["enrichment"] == pytest.approx(n_stable / row["n_in_family"])


def test_family_bookkeeping_on_the_gfx1201_sweep(df):
    _, families = analysis.resonance(df)
    fam = {r["family"]: r for r in families.filter(pl.col("device") == DEVICES["gfx1201"]["device"]).iter_rows(named=True)}
    # flagged: the 8 multiples of 2048 in 1024..16384; 1024 of them are half multiples of 4096
    assert (fam["mult_1024"]["n_flagged"], fam["mult_1024"]["n_in_family"], fam["mult_1024"]["hit_rate"]) == (8, 15, 8 / 15)
    assert (fam["mult_4096"]["flagged_share"], fam["mult_4096"]["score"]) == (0.5, 0.5)
    assert fam["pow2"]["n_in_family"] == 5 and fam["pow2"]["n_flagged"] == 4  # 1024 is a power of two, not slow
    assert "mult_64" not in fam and "mult_128" not in fam  # they hold every swept N: no information


def test_bad_input_names_the_problem_and_the_fix(df):
    with pytest.raises(ValueError, match=r"no grid/repeat rows for impl 'marlin'.*impls measured there"):
        analysis.crossovers(df, impl_b="marlin")
    with pytest.raises(ValueError, match=r"need M=1.*q4lab sweep grid --m 1,"):
        analysis.camping_floors(df.filter(pl.col("M") > 1))
    with pytest.warns(UserWarning, match=r"no M=1 row of 'simt' for \['llama-3-8b.q_proj'\]; those shapes are left out"):
        floors = analysis.camping_floors(df.filter((pl.col("M") > 1) | (pl.col("shape") != "llama-3-8b.q_proj")))
    assert "llama-3-8b.q_proj" not in floors["shape"] and floors["shape"].n_unique() == len(SHAPES) - 1
    with pytest.raises(ValueError, match=r"no N-sweep of 'simt' at K=1234, M=1; \(K, M\) swept: \[\(4096, 1\)\]"):
        analysis.resonance(df, K=1234, M=1)
    with pytest.raises(ValueError, match=r"cannot plant on \('H100', 'llama-3-8b.kv_proj', fp16\)"):
        synthetic_dataset(devices=("H100",), dtypes=("fp16",), nsweep=None,
                          floors={("H100", "llama-3-8b.kv_proj"): (10.0, 64)})
    with pytest.raises(ValueError, match="unknown synthetic devices"):
        synthetic_dataset(devices=("MI300",))


def test_crossover_interpolation_is_log_log():
    m, log_ratio = [4.0, 8.0], [math.log(0.5), math.log(2.0)]  # A twice as fast at 4, twice as slow at 8
    got = analysis._crossing(np.array(m), np.array(log_ratio))
    assert got["crossover_m"] == pytest.approx(math.sqrt(32)) and got["censored"] == "none"
