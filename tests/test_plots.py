"""Figures: devices side by side, units on axes, row numbers in hovers, planted effects visible."""
import math
import re

import plotly.graph_objects as go
import polars as pl
import pytest

from q4lab import analysis, dispatch, notebook_io, plots, tables
from q4lab.synthetic import (DEVICES, PLANTED_FLOORS, PLANTED_UNSTABLE, PLANTED_WAVE_TAILS, SHAPES,
                             synthetic_dataset)

NAMES = sorted(spec["device"] for spec in DEVICES.values())


@pytest.fixture(scope="module")
def df():
    return synthetic_dataset()


def _titles(fig: go.Figure) -> list[str]:
    return [a.text for a in fig.layout.annotations]


def _axis_titles(fig: go.Figure) -> set[str]:
    return {fig.layout[k].title.text for k in fig.layout if k.startswith(("xaxis", "yaxis")) and fig.layout[k].title.text}


def test_shape_selector_shows_one_shape_at_a_time_zoomed_to_its_crossovers(df):
    crossovers = tables.all_crossovers(df, "simt", ["dequant_blas", "dense"])
    fig = plots.shape_selector(df.filter(pl.col("dtype") == "fp16"), crossovers=crossovers)
    assert _titles(fig) == [f"{d} · fp16" for d in NAMES] and fig.layout.height <= 600
    (menu,) = fig.layout.updatemenus
    labels = [b.label for b in menu.buttons]
    assert len(labels) == len(SHAPES) and labels[0] == "llama-3.2-1b.kv_proj (N=512, K=2048)"
    q_proj = menu.buttons[labels.index("llama-3-8b.q_proj (N=4096, K=4096)")]
    visible, view = q_proj.args
    shown = [t for t, v in zip(fig.data, visible["visible"]) if v]
    marks = sorted(t.text[1] for t in shown if t.mode == "lines+text")
    assert marks == ["M* vs dense = 3.02", "M* vs dense = 4.81", "M* vs dequant_blas = 18", "M* vs dequant_blas = 24"]
    assert {t.name for t in shown if t.mode == "lines+markers"} == {"simt", "gemv", "dense", "dequant_blas", "bnb"}
    assert view["xaxis.ticktext"] == ["1", "2", "5", "10", "20", "50", "100", "200"]  # labelled at 1-2-5
    assert set(view) >= {"yaxis.range", "yaxis2.range", "xaxis2.tickvals"}
    # zoomed to M*/8 .. 8 M*: against dequant_blas alone (M* 18 and 24) the M < 18/8 rows drop out
    alone = plots.shape_selector(df.filter(pl.col("dtype") == "fp16", pl.col("shape") == "llama-3-8b.q_proj"),
                                 crossovers=crossovers.filter(pl.col("impl_b") == "dequant_blas"))
    assert alone.layout.updatemenus[0].buttons[0].args[1]["xaxis.range"][0] == pytest.approx(math.log10(2))
    simt = next(t for t in shown if t.name == "simt")
    assert "time [µs]: %{customdata[7]:.4g}" in simt.hovertemplate and simt.error_y.thickness >= 1.5


def test_shape_selector_has_a_row_per_dtype_and_refuses_mixed_quant_types(df):
    fig = plots.shape_selector(df)
    assert _titles(fig) == [f"{d} · {t}" for t in ("bf16", "fp16") for d in NAMES]
    assert {"xaxis4.range", "yaxis4.range"} <= set(fig.layout.updatemenus[0].buttons[0].args[1])  # every panel zooms
    mixed = pl.concat([df, df.with_columns(pl.lit("fp4").alias("quant_type"))]).filter(pl.col("dtype") == "fp16")
    with pytest.raises(ValueError, match=r"mixes \{'quant_type': \['fp4', 'nf4'\]\}; select one first"):
        plots.shape_selector(mixed)


@pytest.mark.parametrize("lo, hi, ticks", [(13.2, 49.3, [10, 20, 50]), (1, 2048, [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]),
                                           (0.3, 0.9, [0.2, 0.5, 1]), (20, 20, [20])])
def test_log_ticks_are_1_2_5_and_hold_the_values(lo, hi, ticks):
    assert plots.log_ticks(lo, hi) == pytest.approx(ticks)


def test_crossover_median_has_a_band_and_a_median_per_impl(df):
    fig = plots.crossover_median(df, ref_impl="dequant_blas")
    medians = [t for t in fig.data if t.mode == "lines+markers"]
    bands = [t for t in fig.data if t.fill == "toself"]
    assert len(medians) == len(bands) and {t.name for t in medians} == {"simt", "gemv", "dense", "bnb"}
    assert "time / time(dequant_blas)" in _axis_titles(fig)
    assert _titles(fig) == [f"{d} · {t}" for t in ("bf16", "fp16") for d in NAMES]


def test_crossover_heatmap_labels_censored_cells_and_fits_its_colours_to_the_data(df):
    crossovers = analysis.crossovers(df)
    fig = plots.crossover_heatmap(crossovers)
    assert len(fig.data) == 2 and _titles(fig) == NAMES
    texts = {t for trace in fig.data for row in trace.text for t in row}
    assert {"> 128", "< 1", "24", "6.75"} <= texts  # right- and left-censored cells, planted M*
    finite = crossovers["crossover_m"].drop_nulls()
    heat = fig.data[0]
    assert (2 ** heat.zmin, 2 ** heat.zmax) == pytest.approx((finite.min(), finite.max()))
    assert fig.layout.xaxis.side == "top"
    assert heat.y[0] == "llama-3.2-1b.kv_proj" and fig.layout.yaxis.autorange == "reversed"  # smallest first


@pytest.mark.parametrize("baselines, quant_types, columns", [
    (None, ("nf4",), ["bf16", "fp16"]),
    (["dequant_blas", "dense"], ("nf4",),
     ["bf16<br>vs dense", "fp16<br>vs dense", "bf16<br>vs dequant_blas", "fp16<br>vs dequant_blas"]),
    (None, ("nf4", "fp4"), ["bf16<br>fp4", "fp16<br>fp4", "bf16<br>nf4", "fp16<br>nf4"]),
])
def test_crossover_heatmap_columns_name_the_dtype_and_the_baseline_and_quant_type_that_vary(
        df, baselines, quant_types, columns):
    data = pl.concat([df.with_columns(pl.lit(q).alias("quant_type")) for q in quant_types])
    crossovers = tables.all_crossovers(data, "simt", baselines) if baselines else analysis.crossovers(data)
    assert list(plots.crossover_heatmap(crossovers).data[0].x) == columns


def test_crossover_summary_chart_draws_censored_medians_open():
    frame = synthetic_dataset(devices=("H100",), dtypes=("fp16",), nsweep=None, floors={}, unstable={},
                              wave_tails={}, crossovers={("H100", name): 300 for name, *_ in SHAPES})
    fig = plots.crossover_summary_chart(analysis.crossover_summary(frame))
    (trace,) = fig.data
    assert list(trace.marker.symbol) == ["circle-open"] and list(trace.y) == [128.0]


def test_camping_scatter_labels_exactly_the_outliers(df):
    floors = analysis.camping_floors(df)
    fig = plots.camping_scatter(floors, "fp16")
    labelled = {(trace.name, text) for trace in fig.data if trace.text is not None for text in trace.text}
    expected = {("camping", shape) for key, shape in PLANTED_FLOORS if (key, shape) not in PLANTED_UNSTABLE}
    expected |= {("wave_tail", s) for _, s in PLANTED_WAVE_TAILS} | {("slow_not_flat", "llama-3-70b.down_proj")}
    assert labelled == expected
    model = [t for t in fig.data if t.name == "bandwidth model"]
    assert len(model) == 2 and all(t.mode == "lines" for t in model)
    assert {"bytes moved at M=1", "time at M=1 [µs]"} <= _axis_titles(fig)
    unstable = [t for t in fig.data if t.marker.symbol is not None and "circle-open" in t.marker.symbol]
    assert unstable  # the unstable floor is drawn open


def test_resonance_plot_colours_flagged_n_by_family(df):
    per_n, _ = analysis.resonance(df)
    fig = plots.resonance_plot(per_n)
    flagged = {t.name: sorted(t.x) for t in fig.data if t.name.startswith("flagged")}
    assert set(flagged) == {"flagged: mult_2048", "flagged: mult_3072"}
    assert flagged["flagged: mult_2048"] == list(range(2048, 16385, 2048))
    unstable = sorted(x for t in fig.data if t.name.startswith("unstable") for x in t.x)
    assert unstable == [5120, 7168]
    assert {"achieved bandwidth [GB/s]", "output features N"} <= _axis_titles(fig)
    assert "residual vs trend" in next(t for t in fig.data if t.name == "flagged: mult_2048").hovertemplate
    assert _titles(fig) == [f"{d} · fp16 · K=4096, M=1" for d in NAMES] and "[" not in fig.layout.title.text


def test_device_ratio_shows_b_over_a_on_a_scale_fitted_to_the_data(df):
    a, b = tables.device_pair(df)
    comparison = tables.device_comparison(df, "simt", a, b)
    fig = plots.device_ratio(comparison)
    assert _titles(fig) == ["bf16", "fp16"] and f"B = {b} over A = {a}" in fig.layout.title.text
    heat = fig.data[0]
    assert heat.zmid == 0 and heat.zmax == pytest.approx(-heat.zmin)
    assert heat.zmax == pytest.approx(max(abs(math.log2(r)) for r in comparison["ratio"]))


def test_shape_curves_draw_an_impl_per_line_with_the_legend_under_the_plot(df):
    fig = plots.shape_curves(df.filter(pl.col("shape") == "llama-3-8b.q_proj", pl.col("dtype") == "fp16"))
    names = {t.name for t in fig.data}
    assert names == {f"{i} · {d}" for i, d in df.filter(pl.col("shape") == "llama-3-8b.q_proj")
                     .select("impl", "device").unique().iter_rows()}
    assert fig.layout.legend.orientation == "h" and fig.layout.legend.y < 0  # not beside it, eating width


def test_offline_renderer_emits_html_without_network_and_plotly_json(df):
    fig = plots.shape_curves(df.filter(pl.col("shape") == "llama-3-8b.q_proj"), "one shape")
    bundle = notebook_io.OfflineRenderer().to_mimebundle(fig.to_dict())
    assert set(bundle) == {"text/html", "application/vnd.plotly.v1+json"}
    assert "Plotly.newPlot" in bundle["text/html"]
    assert not re.search(r"<script[^>]+src=", bundle["text/html"])  # draws with the page's one plotly.js
    # the camera button saves vector SVG named after the title, in JupyterLab too
    assert '"format": "svg", "filename": "q4lab-one-shape"' in bundle["text/html"]
    assert bundle["application/vnd.plotly.v1+json"]["config"]["toImageButtonOptions"]["format"] == "svg"


def test_a_median_known_only_as_an_interval_is_drawn_at_its_upper_bound():
    row = {"device": "d", "dtype": "fp16", "quant_type": "nf4", "blocksize": 64, "nested": False, "cold": True,
           "impl_a": "simt", "impl_b": "dense", "n_shapes": 4, "n_left": 2, "n_right": 0, "median_m": None,
           "median_lo": 4.0, "median_hi": 4.5, "median_label": "4-4.5", "q25_m": None, "q75_m": None,
           "iqr_label": "< 1 .. 8", "threshold_m": 4, "threshold_slowdown": 1.0}
    fig = plots.crossover_summary_chart(pl.DataFrame([row], schema=analysis.SUMMARY_SCHEMA))
    assert list(fig.data[0].y) == [4.5] and fig.data[0].marker.symbol == ("circle-open",)


@pytest.mark.parametrize("value, label", [(0.2, "0.2"), (5, "5"), (2000, "2000"), (50_000, "50k"), (2e6, "2M"), (1e9, "1G")])
def test_tick_labels_are_whole_numbers_with_si_suffixes(value, label):
    assert plots.tick_label(value) == label


def test_a_flagged_n_of_no_family_is_still_drawn(df):
    per_n, _ = analysis.resonance(df)
    lone = per_n.with_columns(pl.when(pl.col("N") == 2048).then(None).otherwise(pl.col("family")).alias("family"))
    fig = plots.resonance_plot(lone)
    assert [list(t.x) for t in fig.data if t.name == "flagged: no family"] == [[2048]]


def test_heatmap_gaps_are_json_nulls_a_widget_can_send(df):
    import json

    fig = plots.crossover_heatmap(tables.all_crossovers(df, "simt", ["bnb", "dequant_blas"]))  # no bnb on gfx1201
    rdna = fig.data[0].z
    assert rdna[0][0] is None and rdna[0][-1] is not None
    json.dumps([list(t.z) for t in fig.data], allow_nan=False)  # NaN would raise here


def test_dispatch_regret_reads_the_regret_only_where_the_rule_missed(df):
    held = dispatch.held_out(df, "per_dtype", "family").filter(pl.col("dtype") == "fp16")
    fig = plots.dispatch_regret(held, "fp16")
    assert _titles(fig) == NAMES
    missed = 0
    for heat, device in zip(fig.data, NAMES):
        cells = {(shape, m): (z, text) for shape, zs, texts in zip(heat.y, heat.z, heat.text)
                 for m, z, text in zip(heat.x, zs, texts)}
        for r in held.filter(pl.col("device") == device).iter_rows(named=True):
            z, text = cells[(r["shape"], str(r["M"]))]
            assert z == pytest.approx(r["regret"])
            assert text == ("" if r["chosen"] == r["best"] else f"{r['regret']:.2f}")
            missed += text != ""
    assert missed > 0
