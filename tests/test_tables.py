"""The published tables: per-shape crossovers against every baseline, the device x dtype pivot, device
against device, the bandwidth-model excess; shown as offline interactive tables and written as files."""
import re

import polars as pl
import pytest

from q4lab import analysis, headlines, tables
from q4lab.synthetic import DEVICES, PLANTED_CROSSOVERS, SHAPES, synthetic_dataset

H100, RDNA = DEVICES["H100"]["device"], DEVICES["gfx1201"]["device"]


@pytest.fixture(scope="module")
def df():
    return synthetic_dataset()


def test_baselines_come_from_the_data(df):
    assert tables.baselines(df, "simt") == ["bnb", "dense", "dequant_blas", "gemv"]
    extra = pl.concat([df, df.filter(pl.col("impl") == "simt").with_columns(pl.lit("mma").alias("impl")),
                       df.filter(pl.col("impl") == "simt").with_columns(pl.lit("auto").alias("impl"))])
    assert tables.baselines(extra, "simt") == ["bnb", "dense", "dequant_blas", "gemv", "mma"]  # never auto
    assert "simt" in tables.baselines(extra, "mma")


def test_crossover_table_has_a_row_per_shape_and_dtype_and_columns_per_baseline(df):
    crossovers = tables.all_crossovers(df, "simt", ["dequant_blas", "dense"])
    table = tables.crossover_table(crossovers)
    assert table.height == len(DEVICES) * 2 * len(SHAPES)  # devices x dtypes x shapes
    assert table.select("device", "dtype", "shape").is_unique().all()
    assert {"family", "N", "K", "M* vs dense", "censored vs dequant_blas", "stable vs dense",
            "crossings vs dequant_blas", "crossover_m vs dense"} <= set(table.columns)
    row = table.filter(pl.col("device") == H100, pl.col("dtype") == "fp16", pl.col("shape") == "llama-3-8b.q_proj").row(0, named=True)
    assert row["crossover_m vs dequant_blas"] == pytest.approx(PLANTED_CROSSOVERS[("H100", "llama-3-8b.q_proj")])
    assert (row["N"], row["K"], row["family"]) == (4096, 4096, "square")
    censored = table.filter(pl.col("device") == RDNA, pl.col("shape") == "llama-3-70b.down_proj")
    assert set(censored["M* vs dequant_blas"]) == {"< 1"} and set(censored["censored vs dequant_blas"]) == {"left"}
    unstable = table.filter(pl.col("device") == RDNA, pl.col("shape") == "llama-3-8b.q_proj")
    assert not unstable["stable vs dequant_blas"].any()


def test_crossover_pivot_has_a_row_per_device_and_baseline_and_a_column_per_dtype(df):
    pivot = tables.crossover_pivot(tables.all_summaries(df, "simt", ["dequant_blas", "dense"]))
    assert pivot.select("device", "baseline").rows() == [(RDNA, "dense"), (RDNA, "dequant_blas"),
                                                          (H100, "dense"), (H100, "dequant_blas")]
    summary = analysis.crossover_summary(df.filter(pl.col("device") == H100, pl.col("dtype") == "fp16")).row(0, named=True)
    cell = pivot.filter(pl.col("device") == H100, pl.col("baseline") == "dequant_blas")["fp16"][0]
    assert cell == f"{summary['median_label']} [{summary['iqr_label']}]; dispatch M ≤ {summary['threshold_m']}"


def test_device_pair_defaults_to_the_first_two_and_checks_names(df):
    assert tables.device_pair(df) == (RDNA, H100)
    assert tables.device_pair(df, device_a=H100) == (H100, RDNA)
    assert tables.device_pair(df.filter(pl.col("device") == H100)) is None
    with pytest.raises(ValueError, match=r"no device 'H200'.*holds \["):
        tables.device_pair(df, device_b="H200")


def test_device_comparison_and_crossover_shift(df):
    comparison = tables.device_comparison(df, "simt", RDNA, H100)
    row = comparison.filter(pl.col("dtype") == "fp16", pl.col("shape") == "llama-3-8b.q_proj", pl.col("M") == 1).row(0, named=True)
    assert row["ratio"] == pytest.approx(row["time_b_us"] / row["time_a_us"]) and row["ratio"] < 1  # the H100 is faster
    assert comparison.height == 2 * len(SHAPES) * 8  # dtypes x shapes x M
    shift = tables.crossover_shift(analysis.crossovers(df), RDNA, H100)
    q_proj = shift.filter(pl.col("dtype") == "fp16", pl.col("shape") == "llama-3-8b.q_proj").row(0, named=True)
    assert q_proj["shift"] == pytest.approx(1 / 0.75)  # the planted M* scale between the two cards
    assert shift.filter(pl.col("shape") == "llama-3-70b.down_proj")["shift"].null_count() == 2  # censored on A


def test_model_excess_is_t1_over_the_model_per_device(df):
    floors = analysis.camping_floors(df)
    excess = tables.model_excess(floors)
    assert excess.height == 4 and (excess["median_over_model"] > 1).all()
    rdna = excess.filter(pl.col("device") == RDNA, pl.col("dtype") == "fp16").row(0, named=True)
    assert rdna["max_over_model"] > 10 > rdna["q75_over_model"]  # the slow, not flat shape


def test_show_writes_csv_and_parquet_and_an_offline_table_without_constant_columns(df, tmp_path, monkeypatch):
    shown = []
    monkeypatch.setattr("IPython.display.display", lambda *objs, **kw: shown.extend(objs))
    table = tables.crossover_table(analysis.crossovers(df)).filter(pl.col("device") == H100)
    tables.show(table, "Per shape", name="crossover_per_shape", export_dir=str(tmp_path))
    assert pl.read_csv(tmp_path / "crossover_per_shape.csv").height == table.height
    assert pl.read_parquet(tmp_path / "crossover_per_shape.parquet").equals(table)
    page = "".join(getattr(o, "data", "") or "" for o in shown)
    assert 'href="crossover_per_shape.csv"' in page and 'href="crossover_per_shape.parquet"' in page
    assert f"device: {H100}" in page and "quant_type: nf4" in page  # said once, not on every row
    assert not re.search(r"<script[^>]+src=[\"']https?:", page)
    data = re.search(r'"data_json": "(.*?)",\n', page).group(1)
    assert "H100" not in data and "nf4" not in data and "llama-3-8b.q_proj" in data  # no constant column


def test_display_frame_rounds_floats_and_keeps_a_single_row_whole():
    shown, constant = tables.display_frame(pl.DataFrame({"a": ["x", "x"], "b": [1.234567, 2.0]}))
    assert constant == {"a": "x"} and shown["b"].to_list() == [1.235, 2.0]
    one, constant = tables.display_frame(pl.DataFrame({"a": ["x"], "b": [1.0]}))
    assert constant == {} and one.columns == ["a", "b"]


def test_an_empty_table_says_none(monkeypatch):
    shown = []
    monkeypatch.setattr("IPython.display.display", lambda *objs, **kw: shown.extend(objs))
    tables.show(pl.DataFrame(schema={"N": pl.Int64}), "Flagged N")
    assert shown[-1].data == "<p><b>Flagged N</b>: none</p>"


def test_the_camping_headline_names_slow_shapes_and_the_overall_excess(df):
    floors = analysis.camping_floors(df)
    (line,) = [s for s in headlines.camping(floors) if s.startswith(f"{RDNA} · fp16")]
    excess = tables.model_excess(floors.filter(pl.col("device") == RDNA, pl.col("dtype") == "fp16")).row(0, named=True)
    assert "1 slow but not flat (rising from M=1, not a floor): llama-3-70b.down_proj (10.8× the model)" in line
    assert line.endswith(f"t(M=1) is {excess['median_over_model']:.2f}× the bandwidth model (interquartile range "
                         f"{excess['q25_over_model']:.2f}-{excess['q75_over_model']:.2f}×)")


def test_static_html_shows_strings_unquoted_and_escaped():
    page = tables.static_html(pl.DataFrame({"device": ["NVIDIA H100 <80GB>"], "rows": [3]}))
    assert page == ("<table><thead><tr><th>device</th><th>rows</th></tr></thead>"
                    "<tbody><tr><td>NVIDIA H100 &lt;80GB&gt;</td><td>3</td></tr></tbody></table>")


def test_show_pages_the_table_or_links_it_alone(monkeypatch, tmp_path):
    shown = []
    monkeypatch.setattr("IPython.display.display", lambda *objs, **kw: shown.extend(objs))
    frame = pl.DataFrame({"shape": [f"s{i}" for i in range(30)], "N": range(30)})
    tables.show(frame, "Paged", page_rows=5)
    assert '"pageLength": 5' in shown[-1].data
    tables.show(frame, "Linked", name="linked", export_dir=str(tmp_path), page_rows=0)
    assert shown[-1].data.endswith(": 30 rows</p>") and "<table" not in shown[-1].data
    assert pl.read_csv(tmp_path / "linked.csv").height == 30
