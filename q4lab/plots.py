"""Plotly figures of datasets and analyses: one function a figure, frames in, figures out.

Devices sit side by side (one column each), so an RDNA card's sweep reads beside an NVIDIA one. Every
marker's hover shows the row's own numbers; every axis says its unit. (How a notebook shows them so that
they survive HTML export offline: `notebook_io.OfflineRenderer`.)
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import plotly.graph_objects as go
import polars as pl
from plotly.subplots import make_subplots

from q4lab import analysis
from q4lab.analysis import GRID_SWEEPS, bandwidth_model_us

IMPL_COLORS = {"simt": "#d62728", "gemv": "#9467bd", "dequant_blas": "#1f77b4", "dense": "#7f7f7f",
               "bnb": "#2ca02c", "torch_int4": "#bcbd22", "mma": "#e377c2", "auto": "#17becf", "reference": "#000000"}
LABEL_COLORS = {"camping": "#d62728", "slow_not_flat": "#8c564b", "wave_tail": "#ff7f0e", "normal": "#9e9e9e"}
FAMILY_COLORS = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
DASHES = ("solid", "dot", "dash", "dashdot")


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
    """A figure facets devices (and, where it says so, dtypes); refuse a mix of anything else rather
    than overlay it."""
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


def _shapes_by_size(df: pl.DataFrame) -> list[str]:
    return df.select("shape", "N", "K").unique().sort("N", "K", "shape")["shape"].to_list()


# ---------------------------------------------------------------------------------------------------------
# Log axes labelled at 1-2-5 with whole numbers ("2", "5" alone at every decade read as noise)
def log_ticks(lo: float, hi: float) -> list[float]:
    """1-2-5 ticks from the largest at or below `lo` to the smallest at or above `hi`, so that every value
    in [lo, hi] lies inside the labelled range."""
    if not 0 < lo <= hi:
        raise ValueError(f"log ticks need 0 < lo <= hi, got {lo}, {hi}")
    steps = [m * 10.0 ** e for e in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1)
             for m in (1, 2, 5)]
    first = max(t for t in steps if t <= lo * (1 + 1e-9))
    last = min(t for t in steps if t >= hi * (1 - 1e-9))
    return [t for t in steps if first <= t <= last]


def tick_label(t: float) -> str:
    """A tick's label: 0.2, 5, 2000, then 50k, 2M, 1G (plotly's "1e+06" reads badly)."""
    for above, scale, suffix in ((1e9, 1e9, "G"), (1e6, 1e6, "M"), (1e4, 1e3, "k")):
        if t >= above:
            return f"{t / scale:g}{suffix}"
    return f"{t:g}"


def _log_axis(values, title: str) -> dict:
    """A log axis (layout properties) whose labelled 1-2-5 ticks span `values`."""
    finite = [float(v) for v in values if v is not None and np.isfinite(v) and v > 0]
    if not finite:
        return {"type": "log", "title_text": title}
    ticks = log_ticks(min(finite), max(finite))
    return {"type": "log", "title_text": title, "tickvals": ticks, "ticktext": [tick_label(t) for t in ticks],
            "range": [math.log10(ticks[0]), math.log10(ticks[-1])]}


def _impl_trace(rows: pl.DataFrame, impl: str, dash: str, name: str, show_legend: bool, visible=True) -> go.Scatter:
    rows = rows.sort("M")
    return go.Scatter(x=rows["M"], y=rows["time_us"], mode="lines+markers", name=name, legendgroup=name,
                      showlegend=show_legend, visible=visible, line={"color": IMPL_COLORS.get(impl, "#333333"), "dash": dash},
                      error_y={"type": "data", "symmetric": False, "array": rows["time_us_hi"] - rows["time_us"],
                               "arrayminus": rows["time_us"] - rows["time_us_lo"], "thickness": 1.5, "width": 4},
                      **_hover(rows, ROW_HOVER))


# ---------------------------------------------------------------------------------------------------------
def shape_curves(df: pl.DataFrame, title: str = "", impls=None, model: bool = False) -> go.Figure:
    """Time vs M (log-log) for one shape: a line per impl, a dash per device; with `model`, the bandwidth
    model per device dotted beside them (launch + the fewest bytes an impl drawn moves / bandwidth)."""
    rows = _one_config(_nonempty(df.filter(pl.col("sweep").is_in(GRID_SWEEPS)), "shape curves", "no grid rows"), "shape curves")
    impls = impls or sorted(rows["impl"].unique().to_list())
    fig = go.Figure()
    for d, device in enumerate(_devices(rows)):
        for impl in impls:
            part = rows.filter(pl.col("device") == device, pl.col("impl") == impl)
            if part.height:
                fig.add_trace(_impl_trace(part, impl, DASHES[d % len(DASHES)], f"{impl} · {device}", True))
    times = [*rows["time_us_lo"], *rows["time_us_hi"]]
    if model:
        lines = (rows.filter(pl.col("impl").is_in(list(impls))).group_by("device", "M")
                 .agg(pl.col("launch_us").median(), pl.col("device_gbps").median(), pl.col("bytes").min())
                 .with_columns(bandwidth_model_us(pl.col("launch_us"), pl.col("bytes"), pl.col("device_gbps"))
                               .alias("model_us")).sort("device", "M"))
        for (device,), line in lines.group_by("device", maintain_order=True):
            fig.add_trace(go.Scatter(x=line["M"], y=line["model_us"], mode="lines", name=f"bandwidth model · {device}",
                                     line={"color": "black", "dash": "dot", "width": 1.5},
                                     hovertemplate="model: %{y:.3g} µs at M=%{x}<extra></extra>"))
        times += lines["model_us"].to_list()
    fig.update_xaxes(**_log_axis(rows["M"], "batch size M"))
    fig.update_yaxes(**_log_axis(times, "time [µs]"))
    # the legend goes under the plot: beside it, "impl · device" names took ~40% of the prober's width
    fig.update_layout(title=title, height=500, legend={"font": {"size": 10}, "orientation": "h", "y": -0.2})
    return fig


def _crossover_window(cell: pl.DataFrame, marks: pl.DataFrame) -> pl.DataFrame:
    """The cell's rows from M*/8 to 8 M* (around every finite M* of `marks`): where the impls cross, not
    the M=2048 end that sets the whole curve's range. All rows when no M* is finite."""
    found = marks["crossover_m"].drop_nulls()
    if found.is_empty():
        return cell
    return cell.filter(pl.col("M").is_between(found.min() / 8, found.max() * 8))


def shape_selector(df: pl.DataFrame, crossovers: pl.DataFrame | None = None, impls=None) -> go.Figure:
    """Time vs M (log-log), a line per impl, a row of panels per dtype and a column per device, one shape
    at a time: a menu picks the shape, each panel zoomed to its crossover region (M*/8 to 8 M*), the
    crossovers from `analysis.crossovers` (if given, against any baselines) marked as dotted lines."""
    rows = df.filter(pl.col("sweep").is_in(GRID_SWEEPS))
    if impls:
        rows = rows.filter(pl.col("impl").is_in(list(impls)))
    rows = _one_config(_nonempty(rows, "shape selector", "no grid rows for these impls"), "shape selector")
    dtypes, devices, shapes = sorted(rows["dtype"].unique().to_list()), _devices(rows), _shapes_by_size(rows)
    marks = crossovers if crossovers is not None else pl.DataFrame(schema=analysis.CROSSOVER_SCHEMA)
    fig = make_subplots(rows=len(dtypes), cols=len(devices), horizontal_spacing=0.08, vertical_spacing=0.12,
                        subplot_titles=[f"{d} · {t}" for t in dtypes for d in devices])
    owners, views = [], []  # the shape index of every trace; each shape's axis ranges
    for i, shape in enumerate(shapes):
        view = {}
        for (r, dtype), (c, device) in itertools.product(enumerate(dtypes, 1), enumerate(devices, 1)):
            cell = rows.filter(pl.col("shape") == shape, pl.col("device") == device, pl.col("dtype") == dtype)
            if cell.is_empty():
                continue
            for impl in sorted(cell["impl"].unique().to_list()):
                first = r == 1 and c == 1
                fig.add_trace(_impl_trace(cell.filter(pl.col("impl") == impl), impl, "solid", impl, first, i == 0),
                              row=r, col=c)
                owners.append(i)
            cell_marks = marks.filter(pl.col("device") == device, pl.col("dtype") == dtype, pl.col("shape") == shape,
                                      pl.col("quant_type") == cell["quant_type"][0])
            window = _crossover_window(cell, cell_marks)
            found = cell_marks.filter(pl.col("crossover_m").is_not_null()).sort("crossover_m")
            for nth, mark in enumerate(found.iter_rows(named=True)):
                fig.add_trace(_crossover_mark(mark, window, i == 0, nth), row=r, col=c)
                owners.append(i)
            suffix = "" if (r, c) == (1, 1) else str((r - 1) * len(devices) + c)
            for axis, spec in (("xaxis", _log_axis(window["M"], "batch size M")),
                               ("yaxis", _log_axis([*window["time_us_lo"], *window["time_us_hi"]], "time [µs]"))):
                view.update({f"{axis}{suffix}.{k}": v for k, v in spec.items() if k != "title_text"})
                fig.layout[f"{axis}{suffix}"].update(title_text=spec["title_text"], type="log")
        views.append(view)
    sizes = {shape: (n, k) for shape, n, k in rows.select("shape", "N", "K").unique().rows()}
    buttons = [{"label": f"{shape} (N={sizes[shape][0]}, K={sizes[shape][1]})", "method": "update",
                "args": [{"visible": [o == i for o in owners]}, views[i]]} for i, shape in enumerate(shapes)]
    fig.update_layout(views[0])
    fig.update_layout(title={"text": "time vs batch size, one shape at a time (pick it in the menu), zoomed to "
                                     "where the impls cross", "y": 0.98},
                      height=300 * len(dtypes) + 160, margin={"t": 130},
                      updatemenus=[{"buttons": buttons, "direction": "down", "x": 0, "xanchor": "left",
                                    "y": 1.0, "yanchor": "bottom", "pad": {"b": 40}, "showactive": True}])
    return fig


def _crossover_mark(mark: dict, window: pl.DataFrame, visible: bool, nth: int = 0) -> go.Scatter:
    """A dotted vertical line at M* across the window's time range (a trace: shapes and annotations on log
    axes want log10 coordinates, traces take data), its label `nth` steps down from the top so that the
    labels of nearby M* do not overprint."""
    m, label = mark["crossover_m"], f"M* vs {mark['impl_b']} = {mark['crossover_label']}"
    low, high = window["time_us"].min(), window["time_us"].max()
    return go.Scatter(x=[m, m, m], y=[low, high * (low / high) ** (0.15 * nth), high], mode="lines+text",
                      text=["", label, ""], textposition="middle right", textfont={"size": 10}, visible=visible,
                      line={"dash": "dot", "color": IMPL_COLORS.get(mark["impl_b"], "black"), "width": 1},
                      showlegend=False, hovertemplate=f"{mark['impl_a']} vs {label}<extra></extra>")


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
    fig.update_xaxes(**_log_axis(stats["M"], "batch size M"))
    fig.update_yaxes(**_log_axis([*stats["q25"], *stats["q75"], 1.0], f"time / time({ref_impl})"))
    fig.update_layout(height=max(380, 280 * len(dtypes)),
                      title=f"median over shapes (band: interquartile range), relative to {ref_impl}")
    return fig


def _gaps(z: np.ndarray) -> list:
    """A heatmap's z with its empty cells as None: NaN is not JSON, and a FigureWidget (the prober's linked
    heatmap) would warn on every message."""
    return [[None if np.isnan(v) else float(v) for v in row] for row in z]


def _grid(rows: pl.DataFrame, shapes: list[str], columns: list, column_of, cell) -> tuple[np.ndarray, ...]:
    """A heatmap panel's z, text and hover [shape, column], filled row by row: `cell(row)` gives the three
    at (the row's shape, `column_of(row)`); cells without a row stay NaN and ""."""
    z = np.full((len(shapes), len(columns)), np.nan)
    text, hover = np.full(z.shape, "", dtype=object), np.full(z.shape, "", dtype=object)
    for row in rows.iter_rows(named=True):
        i, j = shapes.index(row["shape"]), columns.index(column_of(row))
        z[i, j], text[i, j], hover[i, j] = cell(row)
    return z, text, hover


def crossover_heatmap(crossovers: pl.DataFrame) -> go.Figure:
    """Crossover M* per shape (rows) and dtype (columns; one column per dtype and baseline when there are
    several baselines), a panel per device. The colour scale spans the finite M* found (log scale);
    censored cells sit at its ends and read "> M_max" / "< M_min". Column labels sit at the top."""
    _nonempty(crossovers, "crossover heatmap", "no crossovers")
    devices, shapes = _devices(crossovers), _shapes_by_size(crossovers)
    keys = crossovers.select("impl_b", "quant_type", "dtype").unique().sort("impl_b", "quant_type", "dtype").rows()
    several_b, several_q = len({k[0] for k in keys}) > 1, len({k[1] for k in keys}) > 1
    columns = ["<br>".join([dtype, *([quant] if several_q else []), *([f"vs {b}"] if several_b else [])])
               for b, quant, dtype in keys]
    finite = crossovers["crossover_m"].drop_nulls()
    lo, hi = ((finite.min(), finite.max()) if finite.len() else
              (crossovers["m_min_measured"].min(), crossovers["m_max_measured"].max()))
    lo, hi = (lo / 2, hi * 2) if lo == hi else (lo, hi)
    ticks = [t for t in log_ticks(lo, hi) if lo <= t <= hi] or [lo, hi]

    def cell(row):
        value = {"right": hi, "left": lo}.get(row["censored"], row["crossover_m"])
        return math.log2(value), row["crossover_label"], (f"N={row['N']}, K={row['K']}<br>vs {row['impl_b']}<br>"
                                                          f"crossings: {row['n_crossings']}<br>stable: {row['stable']}")

    fig = make_subplots(rows=1, cols=len(devices), shared_yaxes=True, subplot_titles=devices)
    for c, device in enumerate(devices, start=1):
        z, text, info = _grid(crossovers.filter(pl.col("device") == device), shapes, keys,
                              lambda row: (row["impl_b"], row["quant_type"], row["dtype"]), cell)
        fig.add_trace(go.Heatmap(z=_gaps(z), x=columns, y=shapes, text=text, texttemplate="%{text}", customdata=info,
                                 zmin=math.log2(lo), zmax=math.log2(hi), colorscale="Viridis",
                                 showscale=c == 1, colorbar={"title": "M*", "tickvals": np.log2(ticks),
                                                             "ticktext": [f"{t:g}" for t in ticks]},
                                 hovertemplate=f"{device}<br>shape %{{y}}<br>%{{x}}<br>"
                                               "crossover M* = %{text}<br>%{customdata}<extra></extra>"),
                      row=1, col=c)
    fig.update_xaxes(side="top", tickangle=0)
    fig.update_yaxes(autorange="reversed")  # the smallest shapes on top, as in the per-shape table
    fig.update_annotations(yshift=45)  # device names above the column labels
    fig.update_layout(height=max(350, 20 * len(shapes) + 220), margin={"t": 170},
                      title=f"batch size M* up to which {crossovers['impl_a'][0]} beats the baseline, per shape "
                            "(colour: log M*; '>' and '<': censored at the largest / smallest M measured)")
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
    bounds = [*summary["q25_m"], *summary["q75_m"], *summary["median_lo"], *summary["median_hi"]]
    fig.update_yaxes(**_log_axis(bounds, "median crossover M* (over shapes)"))
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
    fig.update_xaxes(**_log_axis(rows["bytes"], "bytes moved at M=1"))
    fig.update_yaxes(**_log_axis([*rows["t1_us"], *rows["model_us"]], "time at M=1 [µs]"))
    fig.update_layout(height=480, title=f"latency floors ({', '.join(sorted(rows['dtype'].unique()))}): time at M=1 "
                                        "against the bandwidth model (open markers: unstable, needs re-measurement)")
    return fig


def resonance_plot(per_n: pl.DataFrame) -> go.Figure:
    """Achieved bandwidth vs N, a row per sweep (device, dtype, K, M), the smooth trend, flagged N coloured
    by family, unstable N as open grey markers. Input: the first frame of `analysis.resonance`."""
    _nonempty(per_n, "resonance plot", "no N-sweep rows")
    sweeps = per_n.select("device", "dtype", "quant_type", "K", "M").unique().sort("device", "dtype", "quant_type", "K", "M").rows()
    several_q = per_n["quant_type"].n_unique() > 1
    titles = [f"{d} · {t}{' · ' + q if several_q else ''} · K={k}, M={m}" for d, t, q, k, m in sweeps]
    fig = make_subplots(rows=len(sweeps), cols=1, shared_xaxes=True, subplot_titles=titles,
                        vertical_spacing=min(0.1, 0.4 / len(sweeps)))
    families = sorted(per_n.filter("flagged")["family"].drop_nulls().unique().to_list())
    hover = {"N": "N", "K": "K", "M": "M", "time_us": "time [µs]", "gbps": "achieved [GB/s]",
             "trend_gbps": "trend [GB/s]", "residual": "residual vs trend", "pow2_factor": "largest 2^k factor",
             "family": "family", "stable": "stable"}
    legend = set()
    for r, key in enumerate(sweeps, start=1):
        d = per_n.filter(*(pl.col(c) == v for c, v in zip(("device", "dtype", "quant_type", "K", "M"), key))).sort("N")
        fig.add_trace(go.Scatter(x=d["N"], y=d["trend_gbps"], mode="lines", name="trend", legendgroup="trend",
                                 showlegend=r == 1, line={"color": "black", "width": 1},
                                 hoverinfo="skip"), row=r, col=1)
        groups = [("not flagged", d.filter(~pl.col("flagged"), pl.col("stable")), {"color": "#9e9e9e", "size": 5}),
                  ("unstable: needs re-measurement", d.filter(~pl.col("stable")),
                   {"color": "#616161", "size": 9, "symbol": "circle-open"})]
        groups += [(f"flagged: {f}", d.filter("flagged", pl.col("family") == f),
                    {"color": FAMILY_COLORS[i % len(FAMILY_COLORS)], "size": 9}) for i, f in enumerate(families)]
        groups.append(("flagged: no family", d.filter("flagged", pl.col("family").is_null()),
                       {"color": "black", "size": 9, "symbol": "x"}))
        for name, part, marker in groups:
            if part.height:
                fig.add_trace(go.Scatter(x=part["N"], y=part["gbps"], mode="markers", name=name, legendgroup=name,
                                         showlegend=name not in legend, marker=marker, **_hover(part, hover)),
                              row=r, col=1)
                legend.add(name)
        fig.update_yaxes(title_text="achieved bandwidth [GB/s]", row=r, col=1)
    fig.update_xaxes(title_text="output features N", row=len(sweeps))
    fig.update_layout(height=300 * len(sweeps) + 100, title="N-sweeps: bandwidth vs N, flagged N by family")
    return fig


def device_ratio(comparison: pl.DataFrame) -> go.Figure:
    """Time on device B over time on device A per shape (rows) and M (columns), a panel per dtype; from
    `tables.device_comparison`. Colour: log2 of the ratio, blue where B is faster, red where slower, the
    scale symmetric about 1 and fitted to the data."""
    _nonempty(comparison, "device ratio", "no shape and M measured on both devices")
    dtypes, shapes = sorted(comparison["dtype"].unique().to_list()), _shapes_by_size(comparison)
    ms = sorted(comparison["M"].unique().to_list())
    reach = max(float(np.abs(np.log2(comparison["ratio"].to_numpy())).max()), 0.05)
    ticks = [t for t in (0.1, 0.2, 0.5, 1, 2, 5, 10) if abs(math.log2(t)) <= reach] or [1]
    fig = make_subplots(rows=1, cols=len(dtypes), shared_yaxes=True, subplot_titles=dtypes)
    for c, dtype in enumerate(dtypes, start=1):
        ratio, _, _ = _grid(comparison.filter(pl.col("dtype") == dtype), shapes, ms, lambda row: row["M"],
                            lambda row: (row["ratio"], "", ""))
        fig.add_trace(go.Heatmap(z=_gaps(np.log2(ratio)), x=[str(m) for m in ms], y=shapes, text=np.round(ratio, 2),
                                 texttemplate="%{text}", textfont={"size": 8}, zmid=0, zmin=-reach, zmax=reach, colorscale="RdBu_r",
                                 showscale=c == 1, colorbar={"title": "B / A", "tickvals": np.log2(ticks),
                                                             "ticktext": [f"{t:g}" for t in ticks]},
                                 hovertemplate="shape %{y}<br>M = %{x}<br>time B / A = %{text}<extra></extra>"),
                      row=1, col=c)
    device_a, device_b = comparison["device_a"][0], comparison["device_b"][0]
    fig.update_xaxes(type="category", side="top")
    fig.update_yaxes(autorange="reversed")
    fig.update_annotations(yshift=40)
    fig.update_layout(height=max(350, 14 * len(shapes) + 220), margin={"t": 170},
                      title=f"{comparison['impl'][0]}: time on B = {device_b} over A = {device_a}, per shape (rows) "
                            "and batch size M (columns)")
    return fig


def dispatch_regret(regrets: pl.DataFrame, dtype: str, title: str = "") -> go.Figure:
    """`dispatch.regret` per shape (rows) and batch size M (columns), a panel per device: colour is the
    regret (time of the chosen impl / the best one, 2x and more in the darkest red); a cell where the rule
    missed reads its regret, and hovering any cell names both impls with their times."""
    rows = _nonempty(regrets.filter(pl.col("dtype") == dtype), "dispatch regret", f"no points for dtype {dtype!r}")
    devices, shapes, ms = _devices(rows), _shapes_by_size(rows), sorted(rows["M"].unique().to_list())

    def cell(r):
        regret = r["regret"] if r["regret"] is not None else np.nan
        missed = "" if r["chosen"] == r["best"] or r["regret"] is None else f"{regret:.2f}"
        return regret, missed, (f"chosen {r['chosen']}: {r['time_chosen_us'] or float('nan'):.4g} µs<br>"
                                f"best {r['best']}: {r['time_best_us']:.4g} µs<br>regret {regret:.3f}×")

    fig = make_subplots(rows=1, cols=len(devices), shared_yaxes=True, subplot_titles=devices)
    for c, device in enumerate(devices, start=1):
        z, text, hover = _grid(rows.filter(pl.col("device") == device), shapes, ms, lambda r: r["M"], cell)
        fig.add_trace(go.Heatmap(z=z, x=[str(m) for m in ms], y=shapes, text=text, customdata=hover,
                                 texttemplate="%{text}", textfont={"size": 8}, zmin=1.0, zmax=2.0,
                                 colorscale="Reds", showscale=c == 1, colorbar={"title": "regret"},
                                 hovertemplate=f"{device}<br>%{{y}} at M=%{{x}}<br>%{{customdata}}<extra></extra>"),
                      row=1, col=c)
    fig.update_xaxes(title_text="batch size M", type="category")
    # 12 px a shape: one of these per dtype, and the page must stay readable (under ~6,000 px)
    fig.update_layout(height=max(350, 12 * len(shapes) + 160),
                      title=title or f"chosen vs best impl per shape and batch size ({dtype})")
    return fig
