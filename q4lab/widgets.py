"""The shape prober: sliders, text fields and a dropdown of measured shapes for N and K, the M range, dtype,
quant type, impls and device, and a plotly FigureWidget of time vs M with the bandwidth model
(launch + bytes / bandwidth) dotted beside the measured curves.

From a dataset it shows the measured shape nearest to the requested (N, K) and says when it is not the
one asked for. With `live=True` on a GPU it measures the requested shape itself, in a background thread
so the notebook stays responsive: a progress bar and a line say what it is doing (building the kernel
library, measuring bandwidth and launch, point k of n) and a cancel button stops it between points,
keeping every point finished. Probes go through the sweep's run log (`q4lab.runlog`), one log per
device and software identity under `runs/`, so a new prober on the same machine starts with the earlier
probes; `save()` compacts them into a parquet dataset for `q4lab report --data`.

`link(figure, prober)` makes a crossover heatmap or a camping scatter open the clicked shape in the
prober. Callbacks are plain methods, so tests drive the prober headless: set a control's `.value`, read
`.figure` (`wait()` joins a live probe). `snapshot()` returns a static copy for exported HTML.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import textwrap
import threading
from pathlib import Path

import ipywidgets as W
import plotly.graph_objects as go
import polars as pl

from q4lab import analysis, dataset, plots, runlog, shapes
from q4lab.notebook_io import REPO, gpu_missing_reason

ALL_DEVICES = "all devices"
LIVE_MS = (1, 2, 4, 8, 16, 32, 64, 128)
TITLE_CHARS = 90  # a title line wraps after about this many characters: plotly never wraps one itself


class ShapeProber:
    def __init__(self, frame: pl.DataFrame | None = None, live: bool = False, N: int = 4096, K: int = 4096,
                 dtype: str | None = None, quant_type: str | None = None, impls=None, blocksize: int = 64,
                 log_dir: str | Path | None = None, device=None):
        self.data = (frame if frame is not None else pl.DataFrame(schema=dataset.SCHEMA)).filter(
            pl.col("sweep").is_in(analysis.GRID_SWEEPS))
        self.blocksize = blocksize
        reason = gpu_missing_reason() if live else None
        self.live = live and reason is None
        self.note = f"live=True, but {reason}: showing the dataset instead. " if reason else ""
        self.log: Path | None = None
        self.probed = pl.DataFrame(schema=dataset.SCHEMA)
        if self.live:
            from q4lab import bench, sweep  # torch: only a live prober needs it

            self.device = bench.as_device(device)
            self.identity = sweep.identity(self.device)
            self.log = probe_log(Path(log_dir) if log_dir else REPO / "runs", self.identity)
        self._reload_probes()  # sets `frame`, the dataset's grid rows and the probes together
        if self.frame.is_empty() and not self.live:
            raise ValueError("the shape prober needs grid rows in the dataset, or live=True on a GPU; "
                             "measure with `q4lab sweep` or pass data=PATH")
        frame = self.frame
        ms = sorted(set(frame["M"].to_list()) | (set(LIVE_MS) if self.live else set()))
        self.controls = {
            "N": self._size_slider("N", N),
            "K": self._size_slider("K", K),
            "M": W.SelectionRangeSlider(options=ms, index=(0, ms.index(LIVE_MS[-1]) if self.live else len(ms) - 1),
                                        description="M range", continuous_update=False),
            "dtype": self._dropdown("dtype", ("fp16", "bf16", "fp32"), dtype),
            "quant_type": self._dropdown("quant_type", ("nf4", "fp4"), quant_type),
            "device": W.Dropdown(options=[ALL_DEVICES, *sorted(frame["device"].unique().to_list())],
                                 description="device"),
            "impls": W.SelectMultiple(options=self._impl_options(), description="impls",
                                      layout=W.Layout(width="max-content", min_width="260px"),
                                      style={"description_width": "initial"}),
        }
        self.controls["impls"].rows = len(self.controls["impls"].options)
        self.controls["impls"].value = tuple(impls or self.controls["impls"].options)
        # Typed sizes and a list of measured shapes: any shape one step away, whatever the sliders hold.
        self.typed = {name: W.Text(value=str(self.controls[name].value), description=f"{name} =",
                                   continuous_update=False, layout=W.Layout(width="150px"),
                                   style={"description_width": "initial"}) for name in ("N", "K")}
        self.shape_list = W.Dropdown(description="shape", layout=W.Layout(width="420px"))
        self.status = W.HTML()
        self.progress = W.IntProgress(min=0, max=1, description="probe", layout=W.Layout(width="300px"))
        self.step = W.HTML()
        self.cancel_button = W.Button(description="cancel", icon="stop", disabled=True)
        self.save_button = W.Button(description="save probes as parquet", icon="save",
                                    layout=W.Layout(width="auto"))
        self.figure = go.FigureWidget()

        self._holding = False  # set while several controls change as one request
        self._listing = False  # set while the shape list is refilled or follows the plot: no request
        self._lock = threading.Lock()
        self._drawing = threading.Lock()  # the probe thread redraws too
        self._busy = False  # a probe thread runs
        self._pending = False  # the controls changed while it ran: probe again when it ends
        self._cancel = threading.Event()
        self._worker: threading.Thread | None = None
        self._tried: set[tuple] = set()  # requests probed already (an impl that failed its check stays missing)
        for control in self.controls.values():
            control.observe(self.update, names="value")
        for text in self.typed.values():
            text.observe(self._typed_size, names="value")
        self.shape_list.observe(self._picked_shape, names="value")
        self.cancel_button.on_click(lambda _: self.cancel())
        self.save_button.on_click(lambda _: self._save_clicked())

        c = self.controls
        rows = [W.HBox([c["N"], self.typed["N"], c["K"], self.typed["K"]]),
                W.HBox([self.shape_list, c["M"]]), W.HBox([c["dtype"], c["quant_type"], c["device"]]), c["impls"]]
        if self.live:
            rows.append(W.HBox([self.progress, self.cancel_button, self.save_button, self.step]))
        self.widget = W.VBox([*rows, self.status, self.figure])
        self._refresh_shape_list()
        self.update()

    # ------------------------------------------------------------------------------------------- state
    def _reload_probes(self) -> None:
        """The probes' rows (every finished point in the log, the one place they live) and `frame`, the
        dataset's grid rows and this device's probes together: joined here, where the probes change, since
        every control and redraw reads it."""
        if self.log is not None and self.log.exists():
            self.probed = runlog.finished_rows(runlog.read_log(self.log))
        self.frame = pl.concat([self.data, self.probed])

    def _size_slider(self, name: str, value: int):
        """Live: any multiple of 64 up to 32768 (or the data's largest), measured on request. From data: only
        the sizes the data has (and the requested one), so every step lands on a measured N or K."""
        sizes = sorted(set(self.frame[name].to_list()) | {value})
        if self.live:
            return W.IntSlider(value=value, min=64, max=max(sizes[-1], 32768), step=64, description=name,
                               continuous_update=False)
        return W.SelectionSlider(options=sizes, value=value, description=name, continuous_update=False)

    def _dropdown(self, column: str, live_options: tuple, value: str | None) -> W.Dropdown:
        """The data's values of `column` (and on a live GPU every one it can measure); `value` must be one of
        them; None starts at the first of `live_options` there, else at the first there is."""
        options = sorted(set(self.frame[column].to_list()) | (set(live_options) if self.live else set()))
        if value is not None and value not in options:
            raise ValueError(f"{column}={value!r} is not in the data, which holds {options}: pick one of those "
                             f"(or measure it with live=True on a GPU)")
        value = value or next((v for v in live_options if v in options), options[0] if options else None)
        return W.Dropdown(options=options, value=value, description="quant" if column == "quant_type" else column)

    def _impl_options(self) -> list[str]:
        """The data's impls, and on a live GPU every impl a sweep times (imported late: q4lab.sweep loads
        torch, which data-only use avoids)."""
        impls = set(self.frame["impl"].to_list())
        if self.live:
            from q4lab.sweep import TIMED_IMPLS
            impls |= set(TIMED_IMPLS)
        return sorted(impls)

    def _refresh_shape_list(self) -> None:
        shape_rows = self.frame.select("shape", "N", "K").unique().sort("N", "K", "shape")
        options = [(f"{s} (N={n}, K={k})", s) for s, n, k in shape_rows.iter_rows()]
        if options != list(self.shape_list.options):
            self._listing = True
            self.shape_list.options = options
            self.shape_list.value = None
            self._listing = False

    def _ipython_display_(self):
        from IPython.display import display
        display(self.widget)

    # ----------------------------------------------------------------------------------- going to a shape
    def open(self, N: int, K: int, dtype: str | None = None) -> None:
        """Show (N, K) (and `dtype`) as one request: the controls change together, then one redraw."""
        self._holding = True
        try:
            for name, size in (("N", N), ("K", K)):
                slider = self.controls[name]
                if self.live:  # any size: the slider's range stretches to it
                    slider.min, slider.max = min(slider.min, size), max(slider.max, size)
                elif size not in slider.options:  # a size the data lacks: the nearest measured shape is shown
                    slider.options = sorted({*slider.options, size})
                slider.value = size
            if dtype is not None and dtype in self.controls["dtype"].options:
                self.controls["dtype"].value = dtype
        finally:
            self._holding = False
        self.update()

    def open_shape(self, shape: str, dtype: str | None = None) -> None:
        """Show the shape named `shape`: one of the data's or probes', or a canonical one."""
        known = self.frame.filter(pl.col("shape") == shape).select("N", "K").unique()
        try:
            N, K = known.row(0) if known.height else shapes.get(shape)[3:5]
        except ValueError as err:
            self.status.value = _error(str(err))
            return
        self.open(N, K, dtype)

    def _typed_size(self, change) -> None:
        if self._holding:
            return
        try:
            N, K = (parse_size(self.typed[name].value, name, self.blocksize) for name in ("N", "K"))
        except ValueError as err:
            self.status.value = _error(str(err))
            return
        self.open(N, K)

    def _picked_shape(self, change) -> None:
        if not self._listing and change["new"] is not None:
            self.open_shape(change["new"])

    # ------------------------------------------------------------------------------------------ drawing
    def selection(self) -> tuple[pl.DataFrame, str]:
        """The rows to draw for the controls' values, and a line saying which shape they are."""
        c = {name: control.value for name, control in self.controls.items()}
        rows = self.frame.filter(pl.col("dtype") == c["dtype"], pl.col("quant_type") == c["quant_type"],
                                 pl.col("impl").is_in(list(c["impls"])), pl.col("M").is_between(*c["M"]))
        if c["device"] != ALL_DEVICES:
            rows = rows.filter(pl.col("device") == c["device"])
        if rows.is_empty():
            return rows, self.note + f"nothing measured for {c['dtype']}, {c['quant_type']}, impls {list(c['impls'])}"
        shape_rows = rows.select("shape", "N", "K").unique()
        # A user moving one slider holds the other: shapes with the requested K come first, then log distance.
        other_k = pl.col("K") != c["K"]
        distance = (pl.col("N").log() - math.log(c["N"])).abs() + (pl.col("K").log() - math.log(c["K"])).abs()
        shape, n, k = shape_rows.sort(other_k, distance, "shape").row(0)
        if (n, k) == (c["N"], c["K"]):
            line = f"{shape} (N={n}, K={k}): measured"
        else:
            line = f"nearest measured shape: {shape} (N={n}, K={k}); N={c['N']}, K={c['K']} was not measured"
        return rows.filter(pl.col("shape") == shape), self.note + line

    def update(self, change=None) -> None:
        """Redraw for the controls' current values (the callback of every control); live, start a probe
        of what this device has not measured yet."""
        if self._holding:
            return
        self._holding = True
        for name, text in self.typed.items():
            text.value = str(self.controls[name].value)
        self._holding = False
        if self.live:
            self._request_probe()
        self._redraw()

    def _redraw(self) -> None:
        with self._drawing:
            self._draw()

    def _draw(self) -> None:
        rows, line = self.selection()
        if rows.height:
            fig = plots.shape_curves(rows, title=wrap_title(line), impls=list(self.controls["impls"].value), model=True)
        else:
            fig = go.Figure(layout={"title": wrap_title(line)})
        with self.figure.batch_update():
            self.figure.data = ()
            self.figure.add_traces(list(fig.data))
            self.figure.layout = fig.layout
        self.status.value = line
        shown = rows.select("shape").unique()["shape"].to_list()
        if shown and self.shape_list.value not in shown:
            self._listing = True
            self.shape_list.value = shown[0]
            self._listing = False

    def snapshot(self) -> go.Figure:
        """A static copy of the current figure (exported HTML cannot show the live widget), its title naming
        the dtype and quant type it shows: a report reader has no dropdown to look at."""
        fig = go.Figure(self.figure)
        fig.update_layout(title_text=f"{fig.layout.title.text} ({self.controls['dtype'].value}, "
                                     f"{self.controls['quant_type'].value})")
        return fig

    # --------------------------------------------------------------------------------------- live probes
    def _request(self) -> tuple:
        c = {name: control.value for name, control in self.controls.items()}
        ms = tuple(m for m in self.controls["M"].options if c["M"][0] <= m <= c["M"][1])
        return c["N"], c["K"], c["dtype"], c["quant_type"], ms, tuple(sorted(c["impls"]))

    def _missing_impls(self, request: tuple) -> list[str]:
        """The requested impls that this device and software (the dataset's rows of the same identity,
        or the probes) lack some requested M of."""
        N, K, dtype, quant_type, ms, impls = request
        have = self.frame.filter(*(pl.col(k) == v for k, v in self.identity.items()), pl.col("N") == N,
                                 pl.col("K") == K, pl.col("dtype") == dtype, pl.col("quant_type") == quant_type,
                                 pl.col("blocksize") == self.blocksize, ~pl.col("nested"), pl.col("cold"))
        return [i for i in impls if not set(ms) <= set(have.filter(pl.col("impl") == i)["M"].to_list())]

    def _request_probe(self) -> None:
        request = self._request()
        if request in self._tried or not self._missing_impls(request):
            return
        with self._lock:
            if self._busy:
                self._pending = True  # the running thread probes the controls' values again when it ends
                return
            self._busy, self._pending = True, False
            self._cancel.clear()
        self.cancel_button.disabled = False
        self._worker = threading.Thread(target=self._probe_loop, name="q4lab-shape-probe", daemon=True)
        self._worker.start()

    def _probe_loop(self) -> None:
        while True:
            request = self._request()
            if request not in self._tried and self._missing_impls(request) and self._probe(request):
                self._tried.add(request)
            self._refresh_shape_list()
            self._redraw()
            with self._lock:
                if not self._pending or self._cancel.is_set():
                    self._busy = False
                    self.cancel_button.disabled = True
                    return
                self._pending = False

    def _probe(self, request: tuple) -> bool:
        """Measure one request through the sweep into the probe log, keeping whatever finished; whether
        it ran to the end (a failed check or a missing impl then stays missing, and is not probed again)."""
        from q4lab import kernels, sweep

        N, K, dtype, quant_type, ms, impls = request
        what = f"N={N}, K={K}"
        try:
            if self.device.type == "cuda":
                self._show_step(f"{what}: building the kernel library (first use on this machine)", 0, 1)
                kernels.library()
            sweep.run_grid([self._probe_shape(N, K)], ms, [dtype], self._missing_impls(request),
                           quant_types=(quant_type,), blocksize=self.blocksize, device=self.device, log=self.log,
                           interleave_ms=False, progress=lambda step, done, total: self._show_step(
                               f"{what}: {step}", done, total), stop=self._cancel)
        except Exception as err:  # shown, not raised: the thread has no caller, and the log keeps every point
            self.step.value = _error(f"{what}: the probe failed ({type(err).__name__}: {err})")
            completed = False
        else:
            completed = not self._cancel.is_set()
            self.step.value = (f"{what}: done" if completed else f"{what}: cancelled; every finished point is "
                               f"kept (probing it again measures only the rest)")
        self._reload_probes()
        return completed

    def _probe_shape(self, N: int, K: int) -> shapes.Shape:
        """The canonical shape of these sizes, so probes sit beside the dataset's rows; else "n{N}_k{K}"."""
        return next((s for s in sorted(shapes.SHAPES) if (s.N, s.K) == (N, K)), None) or shapes.sized_shape(N, K, "nsweep")

    def _show_step(self, line: str, done: int, total: int) -> None:
        self.progress.max, self.progress.value = max(total, 1), done
        self.step.value = line

    def cancel(self) -> None:
        """Stop the running probe at the next point; what finished stays (in the log and the plot)."""
        self._cancel.set()

    def wait(self, timeout: float | None = None) -> None:
        """Until the running probe (if any) has finished and the plot shows it."""
        if self._worker is not None:
            self._worker.join(timeout)

    def save(self, path: str | Path | None = None) -> Path:
        """Write every probe on this device into a parquet dataset (default: beside the log), for
        `q4lab report --data PATH` or to share; return its path."""
        if self.log is None or not self.log.exists():
            raise ValueError("nothing probed on this device yet: probe a shape first (live=True on a GPU)")
        path = Path(path) if path is not None else self.log.with_suffix(".parquet")
        runlog.compact(self.log, path)
        return path

    def _save_clicked(self) -> None:
        try:
            path = self.save()
        except ValueError as err:
            self.step.value = _error(str(err))
        else:
            self.step.value = f"saved {path}: q4lab report --data {path}"


def probe_log(log_dir: str | Path, identity: dict) -> Path:
    """The probes' run log for one device and software identity: one file a device, and a fresh one when
    the kernels, torch or driver change (a log never mixes identities; the old one stays as it was)."""
    device = re.sub(r"[^a-z0-9]+", "-", identity["device"].lower()).strip("-")
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]
    return Path(log_dir) / f"probe-{device}-{digest}.jsonl"


def parse_size(text: str, name: str, blocksize: int) -> int:
    """N or K as typed: a positive whole number, K a multiple of the blocksize."""
    try:
        size = int(text.strip().replace("_", ""))
    except ValueError:
        raise ValueError(f"{name} = {text!r} is not a whole number: type the features, e.g. 4096") from None
    if size <= 0:
        raise ValueError(f"{name} = {size}: it must be positive")
    if name == "K" and size % blocksize:
        below, above = size // blocksize * blocksize, -(-size // blocksize) * blocksize
        raise ValueError(f"K = {size} is not a multiple of the blocksize {blocksize} (every absmax block spans "
                         f"{blocksize} inputs): type {above}" + (f" or {below}" if below else ""))
    return size


def wrap_title(line: str) -> str:
    return "<br>".join(textwrap.wrap(line, TITLE_CHARS))


def link(figure: go.Figure, prober: ShapeProber) -> go.FigureWidget:
    """`figure` (a crossover heatmap: a shape a row, a dtype a column; or a camping scatter: points whose
    hover names shape and dtype) as a FigureWidget whose clicks open the clicked shape in `prober`."""
    widget = figure if isinstance(figure, go.FigureWidget) else go.FigureWidget(figure)
    for trace in widget.data:
        trace.on_click(lambda trace, points, state: _open_clicked(prober, trace, points))
    return widget


def _open_clicked(prober: ShapeProber, trace, points) -> None:
    if not points.point_inds:  # plotly calls every trace's callback; only the clicked one has points
        return
    if trace.type == "heatmap":  # a column is a dtype, perhaps with more lines (quant type, baseline) under it
        prober.open_shape(points.ys[0], points.xs[0].split("<br>")[0])
        return
    fields = _hover_fields(trace)
    if "shape" in fields:
        row = trace.customdata[points.point_inds[0]]
        prober.open_shape(row[fields["shape"]], row[fields["dtype"]] if "dtype" in fields else None)


def _hover_fields(trace) -> dict[str, int]:
    """Which customdata column holds which field, read off the hovertemplate `plots` writes
    ("shape: %{customdata[1]}")."""
    fields = re.findall(r"(?:^|<br>)([^:<]+): %\{customdata\[(\d+)\]", trace.hovertemplate or "")
    return {label: int(i) for label, i in fields}


def _error(text: str) -> str:
    return f"<span style='color:#c62828'>{text}</span>"
