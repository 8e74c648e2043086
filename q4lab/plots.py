"""Plotly figures of datasets and analyses: one function a figure, frames in, figures out.

Devices sit side by side (one column each), so an RDNA card's sweep reads beside an NVIDIA one. Every
marker's hover shows the row's own numbers; every axis says its unit.

`use_offline_renderer()` makes notebooks emit figures that survive HTML export and render offline:
plotly.js embedded once (no CDN), plus plotly's own mime type for JupyterLab.
"""
from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
import polars as pl
from plotly.io._base_renderers import MimetypeRenderer, PlotlyRenderer
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots

from q4lab.analysis import GRID_SWEEPS

IMPL_COLORS = {"simt": "#d62728", "gemv": "#9467bd", "dequant_blas": "#1f77b4", "dense": "#7f7f7f",
               "bnb": "#2ca02c", "reference": "#000000"}
LABEL_COLORS = {"camping": "#d62728", "wave_tail": "#ff7f0e", "normal": "#9e9e9e"}
FAMILY_COLORS = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
DASHES = ("solid", "dot", "dash", "dashdot")


# ---------------------------------------------------------------------------------------------------------
class OfflineRenderer(MimetypeRenderer):
    """text/html that draws with `window.Plotly`, which `activate` embeds once (inline, no network), plus
    plotly's JSON mime type, which JupyterLab prefers when its plotly extension is there."""

    def activate(self):
        from IPython.display import display_html
        display_html("<script>window.PlotlyConfig = {MathJaxConfig: 'local'};</script>"
                     f"<script>{get_plotlyjs()}</script>", raw=True)

    def to_mimebundle(self, fig_dict):
        html = pio.to_html(fig_dict, include_plotlyjs=False, include_mathjax=False, full_html=False,
                           default_width="100%", validate=False)
        return {"text/html": html, **PlotlyRenderer().to_mimebundle(fig_dict)}


def use_offline_renderer():
    """Route `fig.show()` in this kernel through `OfflineRenderer` (plotly's own "notebook" renderer
    pulls MathJax from a CDN into every figure)."""
    pio.renderers["q4lab_offline"] = OfflineRenderer()
    pio.renderers.default = "q4lab_offline"


# ---------------------------------------------------------------------------------------------------------
def _hover(frame: pl.DataFrame, fields: dict[str, str]) -> dict:
    """customdata + hovertemplate showing `fields` (column -> label with unit) of each row."""
    parts = []
    for i, (column, label) in enumerate(fields.items()):
        number = frame[column].dtype.is_float()
        parts.append(f"{label}: %{{customdata[{i}]{':.4g' if number else ''}}}")
    customdata = np.stack([frame[c].to_numpy().astype(object) for c in fields], axis=-1) if frame.height else None
    return {"customdata": customdata, "hovertemplate": "<br>".join(parts) + "<extra></extra>"}


ROW_HOVER = {"device": "device", "shape": "shape", "impl": "impl", "dtype": "dtype", "N": "N", "K": "K",
             "M": "M", "time_us": "time [µs]", "time_us_lo": "p20 [µs]", "time_us_hi": "p80 [µs]",
             "gbps": "achieved [GB/s]", "bytes": "bytes", "spread": "spread between rounds",
             "stable": "stable"}


def _one_config(df: pl.DataFrame, what: str) -> pl.DataFrame:
    """Plots draw one quant config (devices and dtypes are faceted); refuse a mix rather than overlay it."""
    mixed = [c for c in ("quant_type", "blocksize", "nested", "cold") if df[c].n_unique() > 1]
    if mixed:
        options = {c: sorted(df[c].unique().to_list()) for c in mixed}
        raise ValueError(f"{what}: the data mixes {options}; select one first, e.g. "
                         f"df.filter(pl.col({mixed[0]!r}) == {options[mixed[0]][0]!r})")
    return df


def _nonempty(df: pl.DataFrame, what: str, hint: str) -> pl.DataFrame:
    if df.is_empty():
        raise ValueError(f"{what}: nothing to plot ({hint})")
    return df


def _devices(df: pl.DataFrame) -> list[str]:
    return sorted(df["device"].unique().to_list())


def _log_axes(fig: go.Figure, x_title: str, y_title: str, x_log=True, y_log=True):
    fig.update_xaxes(type="log" if x_log else "linear", title_text=x_title)
    fig.update_yaxes(type="log" if y_log else "linear", title_text=y_title)


def _impl_trace(rows: pl.DataFrame, impl: str, dash: str, name: str, show_legend: bool) -> go.Scatter:
    rows = rows.sort("M")
    return go.Scatter(x=rows["M"], y=rows["time_us"], mode="lines+markers", name=name, legendgroup=name,
                      showlegend=show_legend, line={"color": IMPL_COLORS.get(impl), "dash": dash},
                      error_y={"type": "data", "symmetric": False, "array": rows["time_us_hi"] - rows["time_us"],
                               "arrayminus": rows["time_us"] - rows["time_us_lo"], "thickness": 1, "width": 2},
                      **_hover(rows, ROW_HOVER))


# ---------------------------------------------------------------------------------------------------------
def shape_curves(df: pl.DataFrame, title: str = "", impls=None) -> go.Figure:
    """Time vs M (log-log) for one shape: a line per impl, a dash per device."""
    rows = _one_config(_nonempty(df.filter(pl.col("sweep").is_in(GRID_SWEEPS)), "shape curves", "no grid rows"), "shape curves")
    impls = impls or sorted(rows["impl"].unique().to_list())
    fig = go.Figure()
    for d, device in enumerate(_devices(rows)):
        for impl in impls:
            part = rows.filter(pl.col("device") == device, pl.col("impl") == impl)
            if part.height:
                fig.add_trace(_impl_trace(part, impl, DASHES[d % len(DASHES)], f"{impl} · {device}", True))
    _log_axes(fig, "batch size M", "time [µs]")
    # the legend goes under the plot: beside it, "impl · device" names took ~40% of the prober's width
    fig.update_layout(title=title, height=500, legend={"font": {"size": 10}, "orientation": "h", "y": -0.2})
    return fig


def shape_grid(df: pl.DataFrame, dtype: str = "fp16", impls=None, shapes=None,
               crossovers: pl.DataFrame | None = None) -> go.Figure:
    """Small multiples: a row per shape, a column per device; time vs M (log-log), a line per impl; the
    crossover from `analysis.crossovers` (if given) marked as a dotted vertical line."""
    rows = df.filter(pl.col("sweep").is_in(GRID_SWEEPS), pl.col("dtype") == dtype)
    if shapes:
        rows = rows.filter(pl.col("shape").is_in(list(shapes)))
    if impls:
        rows = rows.filter(pl.col("impl").is_in(list(impls)))
    rows = _one_config(_nonempty(rows, "shape grid", f"no grid rows for dtype {dtype!r} and shapes {shapes}"), "shape grid")
    shape_names = (rows.select("shape", "N", "K").unique().sort("N", "K", "shape")["shape"].to_list())
    devices = _devices(rows)
    fig = make_subplots(rows=len(shape_names), cols=len(devices), shared_xaxes=True,
                        vertical_spacing=min(0.08, 0.5 / len(shape_names)), horizontal_spacing=0.06,
                        subplot_titles=[f"{s} · {d}" for s in shape_names for d in devices])
    legend = set()
    for r, shape in enumerate(shape_names, start=1):
        for c, device in enumerate(devices, start=1):
            cell = rows.filter(pl.col("shape") == shape, pl.col("device") == device)
            for impl in sorted(cell["impl"].unique().to_list()):
                fig.add_trace(_impl_trace(cell.filter(pl.col("impl") == impl), impl, "solid", impl, impl not in legend),
                              row=r, col=c)
                legend.add(impl)
            if crossovers is not None:
                _mark_crossover(fig, crossovers, device, dtype, shape, r, c, cell)
    _log_axes(fig, "", "time [µs]")
    fig.update_xaxes(title_text="batch size M", row=len(shape_names))
    fig.update_annotations(font_size=11)
    fig.update_layout(height=max(350, 230 * len(shape_names)), title=f"time vs batch size per shape ({dtype})")
    return fig


def _mark_crossover(fig, crossovers, device, dtype, shape, row, col, cell: pl.DataFrame):
    """A dotted vertical line at M* across the cell's time range (a trace: shapes and annotations on log
    axes want log10 coordinates, traces take data)."""
    hit = crossovers.filter(pl.col("device") == device, pl.col("dtype") == dtype, pl.col("shape") == shape,
                            pl.col("crossover_m").is_not_null())
    if hit.height and cell.height:
        m, label = hit["crossover_m"][0], f"M* = {hit['crossover_label'][0]}"
        fig.add_trace(go.Scatter(x=[m, m], y=[cell["time_us"].min(), cell["time_us"].max()], mode="lines+text",
                                 text=["", label], textposition="top right", textfont={"size": 10},
                                 line={"dash": "dot", "color": "black", "width": 1}, showlegend=False,
                                 hovertemplate=f"{hit['impl_a'][0]} vs {hit['impl_b'][0]}: {label}<extra></extra>"),
                      row=row, col=col)


def crossover_median(df: pl.DataFrame, ref_impl: str = "dequant_blas", impls=None) -> go.Figure:
    """Time relative to `ref_impl` vs M: the median over shapes (line) and interquartile range (band) per
    impl; a column per device, a row per dtype. Below 1: faster than the reference."""
    rows = _one_config(df.filter(pl.col("sweep").is_in(GRID_SWEEPS)), "crossover median")
    keys = ["device", "dtype", "shape", "M"]
    ref = rows.filter(pl.col("impl") == ref_impl).group_by(keys).agg(pl.col("time_us").median().alias("ref_us"))
    _nonempty(ref, "crossover median", f"no rows of the reference impl {ref_impl!r}")
    rel = (rows.filter(pl.col("impl") != ref_impl).join(ref, on=keys)
           .with_columns((pl.col("time_us") / pl.col("ref_us")).alias("relative")))
    if impls:
        rel = rel.filter(pl.col("impl").is_in(list(impls)))
    stats = (rel.group_by("device", "dtype", "impl", "M")
             .agg(pl.col("relative").median().alias("median"), pl.col("relative").quantile(0.25).alias("q25"),
                  pl.col("relative").quantile(0.75).alias("q75"), pl.col("shape").n_unique().alias("shapes"))
             .sort("M"))
    devices, dtypes = _devices(rows), sorted(stats["dtype"].unique().to_list())
    fig = make_subplots(rows=len(dtypes), cols=len(devices), shared_yaxes=True,
                        subplot_titles=[f"{d} · {t}" for t in dtypes for d in devices])
    legend = set()
    for r, dtype in enumerate(dtypes, start=1):
        for c, device in enumerate(devices, start=1):
            for impl in sorted(stats["impl"].unique().to_list()):
                s = stats.filter(pl.col("device") == device, pl.col("dtype") == dtype, pl.col("impl") == impl)
                if not s.height:
                    continue
                color = IMPL_COLORS.get(impl, "#333333")
                fig.add_trace(go.Scatter(x=np.concatenate([s["M"], s["M"][::-1]]),
                                         y=np.concatenate([s["q75"], s["q25"][::-1]]), fill="toself",
                                         fillcolor=color, opacity=0.15, line={"width": 0}, hoverinfo="skip",
                                         legendgroup=impl, showlegend=False), row=r, col=c)
                fig.add_trace(go.Scatter(x=s["M"], y=s["median"], mode="lines+markers", name=impl,
                                         legendgroup=impl, showlegend=impl not in legend, line={"color": color},
                                         **_hover(s.with_columns(pl.lit(device).alias("device"), pl.lit(impl).alias("impl")),
                                                  {"device": "device", "impl": "impl", "M": "M",
                                                   "median": f"median t/t({ref_impl})", "q25": "25th pct",
                                                   "q75": "75th pct", "shapes": "shapes"})), row=r, col=c)
                legend.add(impl)
            fig.add_hline(y=1, line={"dash": "dot", "color": "black", "width": 1}, row=r, col=c)
    _log_axes(fig, "batch size M", f"time / time({ref_impl})")
    fig.update_layout(height=max(380, 330 * len(dtypes)),
                      title=f"median over shapes (band: interquartile range), relative to {ref_impl}")
    return fig


def crossover_heatmap(crossovers: pl.DataFrame) -> go.Figure:
    """Crossover M* per shape (rows) and dtype (columns), a panel per device; colour is log2 M*,
    censored cells sit at the edge of the scale and read "> M_max" / "< M_min"."""
    _nonempty(crossovers, "crossover heatmap", "no crossovers")
    devices = _devices(crossovers)
    shapes = crossovers.select("shape", "N", "K").unique().sort("N", "K", "shape")["shape"].to_list()
    dtypes = sorted(crossovers["dtype"].unique().to_list())
    m_min, m_max = crossovers["m_min_measured"].min(), crossovers["m_max_measured"].max()
    ticks = [2 ** k for k in range(int(math.log2(m_min)), int(math.log2(m_max)) + 1)]
    fig = make_subplots(rows=1, cols=len(devices), shared_yaxes=True, subplot_titles=devices)
    for c, device in enumerate(devices, start=1):
        z = np.full((len(shapes), len(dtypes)), np.nan)
        text = np.full((len(shapes), len(dtypes)), "", dtype=object)
        for row in crossovers.filter(pl.col("device") == device).iter_rows(named=True):
            i, j = shapes.index(row["shape"]), dtypes.index(row["dtype"])
            value = {"right": 2 * row["m_max_measured"], "left": row["m_min_measured"] / 2}.get(row["censored"], row["crossover_m"])
            z[i, j], text[i, j] = math.log2(value), row["crossover_label"]
        fig.add_trace(go.Heatmap(z=z, x=dtypes, y=shapes, text=text, texttemplate="%{text}",
                                 zmin=math.log2(m_min / 2), zmax=math.log2(2 * m_max), colorscale="Viridis",
                                 showscale=c == 1, colorbar={"title": "M*", "tickvals": np.log2(ticks),
                                                             "ticktext": [str(t) for t in ticks]},
                                 hovertemplate=f"{device}<br>shape %{{y}}<br>dtype %{{x}}<br>"
                                               "crossover M* = %{text}<extra></extra>"),
                      row=1, col=c)
    impl_a, impl_b = crossovers["impl_a"][0], crossovers["impl_b"][0]
    fig.update_xaxes(title_text="activation dtype")
    fig.update_layout(height=max(350, 28 * len(shapes) + 160),
                      title=f"batch size M* up to which {impl_a} beats {impl_b}, per shape "
                            "(> M: still winning at the largest M measured)")
    return fig


def crossover_summary_chart(summary: pl.DataFrame) -> go.Figure:
    """Median crossover per device and dtype with its interquartile range, from
    `analysis.crossover_summary`; a censored median is drawn at its finite bound (the upper one when both
    are finite) with an open marker."""
    _nonempty(summary, "crossover summary", "no summary rows")
    fig = go.Figure()
    for dtype in sorted(summary["dtype"].unique().to_list()):
        s = summary.filter(pl.col("dtype") == dtype).sort("device")
        y = [lo if math.isinf(hi) else hi for lo, hi in zip(s["median_lo"], s["median_hi"])]
        fig.add_trace(go.Scatter(
            x=s["device"], y=y, mode="markers", name=dtype, marker={"size": 12, "symbol": [
                "circle" if m is not None else "circle-open" for m in s["median_m"]]},
            error_y={"type": "data", "symmetric": False,
                     "array": [(q - v) if q is not None else 0 for q, v in zip(s["q75_m"], y)],
                     "arrayminus": [(v - q) if q is not None else 0 for q, v in zip(s["q25_m"], y)]},
            **_hover(s, {"device": "device", "dtype": "dtype", "median_label": "median M*", "iqr_label": "IQR",
                         "n_shapes": "shapes", "threshold_m": "dispatch threshold M"})))
    fig.update_yaxes(type="log", title_text="median crossover M* (over shapes)")
    fig.update_layout(title=f"{summary['impl_a'][0]} vs {summary['impl_b'][0]}: median crossover, interquartile range",
                      height=380, scattermode="group")
    return fig


def camping_scatter(floors: pl.DataFrame, dtype: str | None = None) -> go.Figure:
    """t(M=1) against bytes moved (log-log) per shape, the bandwidth model as a line, labelled outliers
    (camping floors, wave tails) by name; a panel per device. Input: `analysis.camping_floors`."""
    rows = floors if dtype is None else floors.filter(pl.col("dtype") == dtype)
    rows = _nonempty(rows, "camping scatter", f"no floors for dtype {dtype!r}")
    devices = _devices(rows)
    fig = make_subplots(rows=1, cols=len(devices), subplot_titles=devices)
    hover = {"shape": "shape", "dtype": "dtype", "N": "N", "K": "K", "bytes": "bytes (M=1)",
             "t1_us": "t(M=1) [µs]", "model_us": "model [µs]", "floor_us": "floor [µs]", "m_floor": "flat up to M",
             "excess_ratio": "floor / model", "z": "robust z", "wave_slowdown": "wave model slowdown",
             "label": "label", "stable": "stable"}
    legend = set()
    for c, device in enumerate(devices, start=1):
        d = rows.filter(pl.col("device") == device).sort("bytes")
        fig.add_trace(go.Scatter(x=d["bytes"], y=d["model_us"], mode="lines", name="bandwidth model",
                                 legendgroup="model", showlegend=c == 1, line={"color": "black", "dash": "dot"},
                                 hovertemplate="model: %{y:.3g} µs at %{x:.3g} bytes<extra></extra>"), row=1, col=c)
        for label, color in LABEL_COLORS.items():
            part = d.filter(pl.col("label") == label)
            if not part.height:
                continue
            fig.add_trace(go.Scatter(x=part["bytes"], y=part["t1_us"], name=label, legendgroup=label,
                                     showlegend=label not in legend,
                                     mode="markers" if label == "normal" else "markers+text",
                                     text=part["shape"] if label != "normal" else None, textposition="top center",
                                     marker={"color": color, "size": 9 if label != "normal" else 7,
                                             "symbol": ["circle" if s else "circle-open" for s in part["stable"]]},
                                     **_hover(part, hover)), row=1, col=c)
            legend.add(label)
    _log_axes(fig, "bytes moved at M=1", "time at M=1 [µs]")
    fig.update_layout(height=480, title="latency floors: time at M=1 against the bandwidth model"
                                        " (open markers: unstable, needs re-measurement)")
    return fig


def resonance_plot(per_n: pl.DataFrame) -> go.Figure:
    """Achieved bandwidth vs N (a row per device), the smooth trend, flagged N coloured by family,
    unstable N as open grey markers. Input: the first frame of `analysis.resonance`."""
    _nonempty(per_n, "resonance plot", "no N-sweep rows")
    devices = _devices(per_n)
    fig = make_subplots(rows=len(devices), cols=1, shared_xaxes=True, subplot_titles=devices,
                        vertical_spacing=0.12 if len(devices) > 1 else 0.1)
    families = sorted(per_n.filter("flagged")["family"].drop_nulls().unique().to_list())
    hover = {"N": "N", "K": "K", "M": "M", "time_us": "time [µs]", "gbps": "achieved [GB/s]",
             "trend_gbps": "trend [GB/s]", "residual": "residual vs trend", "pow2_factor": "largest 2^k factor",
             "family": "family", "stable": "stable"}
    legend = set()
    for r, device in enumerate(devices, start=1):
        d = per_n.filter(pl.col("device") == device).sort("N")
        fig.add_trace(go.Scatter(x=d["N"], y=d["trend_gbps"], mode="lines", name="trend", legendgroup="trend",
                                 showlegend=r == 1, line={"color": "black", "width": 1},
                                 hoverinfo="skip"), row=r, col=1)
        groups = [("not flagged", d.filter(~pl.col("flagged"), pl.col("stable")), {"color": "#9e9e9e", "size": 5}),
                  ("unstable: needs re-measurement", d.filter(~pl.col("stable")),
                   {"color": "#616161", "size": 9, "symbol": "circle-open"})]
        groups += [(f"flagged: {f}", d.filter("flagged", pl.col("family") == f),
                    {"color": FAMILY_COLORS[i % len(FAMILY_COLORS)], "size": 9}) for i, f in enumerate(families)]
        for name, part, marker in groups:
            if part.height:
                fig.add_trace(go.Scatter(x=part["N"], y=part["gbps"], mode="markers", name=name, legendgroup=name,
                                         showlegend=name not in legend, marker=marker, **_hover(part, hover)),
                              row=r, col=1)
                legend.add(name)
    _log_axes(fig, "", "achieved bandwidth [GB/s]", x_log=False, y_log=False)
    fig.update_xaxes(title_text="output features N", row=len(devices))
    k, m = per_n["K"].unique().to_list(), per_n["M"].unique().to_list()
    fig.update_layout(height=320 * len(devices) + 80, title=f"N-sweep at K={k}, M={m}: bandwidth vs N, flagged N by family")
    return fig


def dispatch_regret(regrets: pl.DataFrame, dtype: str, title: str = "") -> go.Figure:
    """`dispatch.regret` per shape (rows) and batch size M (columns), a panel per device: colour is the
    regret (time of the chosen impl / the best one, 2x and more in the darkest red); a cell where the rule
    missed reads `chosen → best`, and hovering it gives both times."""
    rows = _nonempty(regrets.filter(pl.col("dtype") == dtype), "dispatch regret", f"no points for dtype {dtype!r}")
    devices = _devices(rows)
    shapes = rows.select("shape", "N", "K").unique().sort("N", "K", "shape")["shape"].to_list()
    ms = sorted(rows["M"].unique().to_list())
    fig = make_subplots(rows=1, cols=len(devices), shared_yaxes=True, subplot_titles=devices)
    for c, device in enumerate(devices, start=1):
        z = np.full((len(shapes), len(ms)), np.nan)
        text = np.full((len(shapes), len(ms)), "", dtype=object)
        hover = np.full((len(shapes), len(ms)), "", dtype=object)
        for r in rows.filter(pl.col("device") == device).iter_rows(named=True):
            i, j = shapes.index(r["shape"]), ms.index(r["M"])
            z[i, j] = r["regret"] if r["regret"] is not None else np.nan
            text[i, j] = "" if r["chosen"] == r["best"] else f"{r['chosen']} → {r['best']}"
            hover[i, j] = (f"chosen {r['chosen']}: {r['time_chosen_us'] or float('nan'):.4g} µs<br>"
                           f"best {r['best']}: {r['time_best_us']:.4g} µs<br>regret {z[i, j]:.3f}×")
        fig.add_trace(go.Heatmap(z=z, x=[str(m) for m in ms], y=shapes, text=text, customdata=hover,
                                 texttemplate="%{text}", textfont={"size": 8}, zmin=1.0, zmax=2.0,
                                 colorscale="Reds", showscale=c == 1, colorbar={"title": "regret"},
                                 hovertemplate=f"{device}<br>%{{y}} at M=%{{x}}<br>%{{customdata}}<extra></extra>"),
                      row=1, col=c)
    fig.update_xaxes(title_text="batch size M", type="category")
    fig.update_layout(height=max(350, 24 * len(shapes) + 160),
                      title=title or f"chosen vs best impl per shape and batch size ({dtype})")
    return fig
