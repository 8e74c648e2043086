"""The shape prober: sliders and dropdowns for N, K, the M range, dtype, quant type, impls and device,
and a plotly FigureWidget of time vs M that redraws on every change.

From a dataset it shows the measured shape nearest to the requested (N, K) and says when it is not the
one asked for; with `live=True` on a GPU it measures the requested shape itself (through
`q4lab.sweep.run_grid`) and keeps what it measured. Its callback (`update`) is a plain method, so tests
drive it headless: set a control's `.value`, read `.figure`. `snapshot()` returns a static copy for
exported HTML, where a live widget does not render.
"""
from __future__ import annotations

import math

import ipywidgets as W
import plotly.graph_objects as go
import polars as pl

from q4lab import analysis, dataset, plots
from q4lab.notebook_io import gpu_missing_reason

ALL_DEVICES = "all devices"
LIVE_MS = (1, 2, 4, 8, 16, 32, 64, 128)


class ShapeProber:
    def __init__(self, frame: pl.DataFrame | None = None, live: bool = False, N: int = 4096, K: int = 4096,
                 dtype: str = "fp16", quant_type: str = "nf4", impls=None):
        self.frame = (frame if frame is not None else pl.DataFrame(schema=dataset.SCHEMA)).filter(
            pl.col("sweep").is_in(analysis.GRID_SWEEPS))
        reason = gpu_missing_reason() if live else None
        self.live = live and reason is None
        self.note = f"live=True, but {reason}: showing the dataset instead. " if reason else ""
        if self.frame.is_empty() and not self.live:
            raise ValueError("the shape prober needs grid rows in the dataset, or live=True on a GPU; "
                             "measure with `q4lab sweep` or pass data=PATH")
        data_impls = sorted(self.frame["impl"].unique().to_list())
        ms = sorted(set(self.frame["M"].to_list()) | (set(LIVE_MS) if self.live else set()))
        devices = sorted(self.frame["device"].unique().to_list())
        self.controls = {
            "N": self._size_slider("N", N),
            "K": self._size_slider("K", K),
            "M": W.SelectionRangeSlider(options=ms, index=(0, len(ms) - 1), description="M range",
                                        continuous_update=False),
            "dtype": W.Dropdown(options=self._options("dtype", ("fp16", "bf16", "fp32")), value=dtype,
                                description="dtype"),
            "quant_type": W.Dropdown(options=self._options("quant_type", ("nf4", "fp4")), value=quant_type,
                                     description="quant"),
            "device": W.Dropdown(options=[ALL_DEVICES, *devices], description="device"),
            "impls": W.SelectMultiple(options=sorted(set(data_impls) | (set(_timed_impls()) if self.live else set())),
                                      description="impls", rows=5),
        }
        self.controls["impls"].value = tuple(impls or self.controls["impls"].options)
        self.status = W.HTML()
        self.figure = go.FigureWidget()
        for control in self.controls.values():
            control.observe(self.update, names="value")
        c = self.controls
        self.widget = W.VBox([W.HBox([c["N"], c["K"], c["M"]]), W.HBox([c["dtype"], c["quant_type"], c["device"]]),
                              c["impls"], self.status, self.figure])
        self.update()

    def _size_slider(self, name: str, value: int):
        """Live: any multiple of 64 up to 32768 (or the data's largest), measured on request. From data: only
        the sizes the data has (and the requested one), so every step lands on a measured N or K."""
        sizes = sorted(set(self.frame[name].to_list()) | {value})
        if self.live:
            return W.IntSlider(value=value, min=64, max=max(sizes[-1], 32768), step=64, description=name,
                               continuous_update=False)
        return W.SelectionSlider(options=sizes, value=value, description=name, continuous_update=False)

    def _options(self, column: str, live_options: tuple) -> list:
        return sorted(set(self.frame[column].to_list()) | (set(live_options) if self.live else set()))

    def _ipython_display_(self):
        from IPython.display import display
        display(self.widget)

    def selection(self) -> tuple[pl.DataFrame, str]:
        """The rows to draw for the controls' values, and a line saying which shape they are."""
        c = {name: control.value for name, control in self.controls.items()}
        if self.live:
            self._measure(c)
        rows = self.frame.filter(pl.col("dtype") == c["dtype"], pl.col("quant_type") == c["quant_type"],
                                 pl.col("impl").is_in(list(c["impls"])), pl.col("M").is_between(*c["M"]))
        if c["device"] != ALL_DEVICES:
            rows = rows.filter(pl.col("device") == c["device"])
        if rows.is_empty():
            return rows, self.note + f"nothing measured for {c['dtype']}, {c['quant_type']}, impls {list(c['impls'])}"
        shapes = rows.select("shape", "N", "K").unique()
        # A user moving one slider holds the other: shapes with the requested K come first, then log distance.
        other_k = pl.col("K") != c["K"]
        distance = (pl.col("N").log() - math.log(c["N"])).abs() + (pl.col("K").log() - math.log(c["K"])).abs()
        shape, n, k = shapes.sort(other_k, distance, "shape").row(0)
        if (n, k) == (c["N"], c["K"]):
            line = f"{shape} (N={n}, K={k}): measured"
        else:
            line = f"nearest measured shape: {shape} (N={n}, K={k}); N={c['N']}, K={c['K']} was not measured"
        return rows.filter(pl.col("shape") == shape), self.note + line

    def _measure(self, c: dict) -> None:
        """Measure the requested shape on this GPU unless already measured with these settings."""
        from q4lab import sweep
        from q4lab.shapes import nsweep_shape

        ms = [m for m in self.controls["M"].options if c["M"][0] <= m <= c["M"][1]]
        have = self.frame.filter(pl.col("N") == c["N"], pl.col("K") == c["K"], pl.col("dtype") == c["dtype"],
                                 pl.col("quant_type") == c["quant_type"])
        missing = [i for i in c["impls"] if not set(ms) <= set(have.filter(pl.col("impl") == i)["M"].to_list())]
        if missing:
            self.status.value = f"measuring N={c['N']}, K={c['K']} ..."
            measured = sweep.run_grid([nsweep_shape(c["N"], c["K"])], ms, [c["dtype"]], missing,
                                      quant_types=(c["quant_type"],), progress=False)
            self.frame = pl.concat([self.frame, measured])  # run_grid writes dataset.SCHEMA already

    def update(self, change=None) -> None:
        """Redraw the figure for the controls' current values (the callback of every control)."""
        rows, line = self.selection()
        fig = plots.shape_curves(rows, title=line, impls=list(self.controls["impls"].value)) if rows.height \
            else go.Figure(layout={"title": line})
        with self.figure.batch_update():
            self.figure.data = ()
            self.figure.add_traces(list(fig.data))
            self.figure.layout = fig.layout
        self.status.value = line

    def snapshot(self) -> go.Figure:
        """A static copy of the current figure (exported HTML cannot show the live widget)."""
        return go.Figure(self.figure)


def _timed_impls() -> tuple[str, ...]:
    """The impls a live sweep can time (imported late: q4lab.sweep loads torch, which data-only use avoids)."""
    from q4lab.sweep import TIMED_IMPLS
    return TIMED_IMPLS
