"""The shape prober driven headless: set a control's value, type a size, click a linked figure, read the
figure."""
import threading

import plotly.graph_objects as go
import polars as pl
import pytest

from q4lab import analysis, bench, plots, runlog, tables, widgets
from q4lab.synthetic import DEVICES, synthetic_dataset

H100 = DEVICES["H100"]["device"]


@pytest.fixture(scope="module")
def df():
    return synthetic_dataset(nsweep=None)


@pytest.fixture
def prober(df):
    return widgets.ShapeProber(df, N=4096, K=4096)


def _curves(prober) -> dict[str, tuple]:
    """The measured curves by name (the bandwidth model's lines left out)."""
    return {t.name: (tuple(t.x), tuple(t.y)) for t in prober.figure.data if not t.name.startswith("bandwidth model")}


def _models(prober) -> dict[str, go.Scatter]:
    return {t.name: t for t in prober.figure.data if t.name.startswith("bandwidth model")}


def test_starts_on_the_requested_measured_shape(prober):
    assert prober.status.value == "llama-3-8b.q_proj (N=4096, K=4096): measured"
    assert prober.figure.layout.title.text == prober.status.value
    assert len(_curves(prober)) == 9  # 5 impls on the H100, 4 on the gfx1201 (no bnb)
    assert len(_models(prober)) == 2  # the bandwidth model, a line per device
    assert prober.figure.layout.xaxis.type == "log" and prober.figure.layout.yaxis.title.text == "time [µs]"


def test_moving_n_redraws_with_the_new_shape(prober):
    before = _curves(prober)
    prober.controls["N"].value = 14336
    assert prober.status.value == "llama-3-8b.up_proj (N=14336, K=4096): measured"
    after = _curves(prober)
    assert set(after) == set(before) and all(after[name][1] != before[name][1] for name in after)


def test_from_data_the_size_sliders_step_through_the_measured_sizes(prober, df):
    grid = df.filter(pl.col("sweep") == "grid")
    assert list(prober.controls["N"].options) == sorted(set(grid["N"].to_list()))
    assert list(prober.controls["K"].options) == sorted(set(grid["K"].to_list()))


def test_an_unmeasured_shape_shows_the_nearest_one_and_says_so(df):
    prober = widgets.ShapeProber(df, N=4032, K=3520)  # the requested sizes join the sliders' options
    assert prober.status.value == ("nearest measured shape: gemma-2-9b.q_proj (N=4096, K=3584); "
                                   "N=4032, K=3520 was not measured")


def test_moving_n_alone_keeps_k_when_that_k_was_measured(prober):
    prober.controls["N"].value = 18944  # measured with K=3584 only
    assert prober.status.value.startswith("nearest measured shape: ")
    assert ", K=4096); N=18944, K=4096 was not measured" in prober.status.value


def test_impls_device_dtype_and_m_range_filter_the_curves(prober, df):
    prober.controls["impls"].value = ("simt", "dequant_blas")
    assert sorted(_curves(prober)) == sorted(f"{i} · {d}" for i in ("simt", "dequant_blas")
                                             for d in df["device"].unique())
    prober.controls["device"].value = H100
    assert sorted(_curves(prober)) == [f"dequant_blas · {H100}", f"simt · {H100}"]
    fp16 = _curves(prober)[f"dequant_blas · {H100}"][1]
    prober.controls["dtype"].value = "bf16"
    bf16 = _curves(prober)[f"dequant_blas · {H100}"][1]
    assert bf16 == pytest.approx([1.03 * t for t in fp16])  # the synthetic bf16 factor
    prober.controls["M"].value = (2, 16)
    assert _curves(prober)[f"simt · {H100}"][0] == (2, 4, 8, 16)


def test_snapshot_is_a_static_copy(prober):
    snapshot = prober.snapshot()
    assert type(snapshot) is go.Figure and snapshot.layout.title.text == f"{prober.status.value} (fp16, nf4)"
    prober.controls["N"].value = 14336
    assert snapshot.layout.title.text != prober.figure.layout.title.text  # did not follow the widget


def test_no_data_and_no_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(widgets, "gpu_missing_reason", lambda: "this machine has no usable GPU")
    with pytest.raises(ValueError, match="needs grid rows in the dataset, or live=True on a GPU"):
        widgets.ShapeProber(None, live=True)


def test_live_without_a_gpu_says_so_and_shows_the_data(df, monkeypatch):
    monkeypatch.setattr(widgets, "gpu_missing_reason", lambda: "this machine has no usable GPU")
    prober = widgets.ShapeProber(df, live=True)
    assert prober.status.value.startswith("live=True, but this machine has no usable GPU: showing the dataset")


def test_the_bandwidth_model_is_a_dotted_line_of_launch_plus_bytes_over_bandwidth(prober, df):
    model = _models(prober)[f"bandwidth model · {H100}"]
    assert model.line.dash == "dot"
    rows = df.filter(pl.col("shape") == "llama-3-8b.q_proj", pl.col("device") == H100, pl.col("dtype") == "fp16",
                     pl.col("impl") == "simt").sort("M")  # the 4-bit weight: the fewest bytes of the impls drawn
    assert tuple(model.x) == tuple(rows["M"])
    low, high = prober.figure.layout.yaxis.range  # log10: the axis shows the whole model line
    assert 10 ** low <= min(model.y) and max(model.y) <= 10 ** high
    assert model.y == pytest.approx([analysis.bandwidth_model_us(r["launch_us"], r["bytes"], r["device_gbps"])
                                     for r in rows.iter_rows(named=True)])


def test_a_long_title_wraps_and_the_legend_sits_below_the_plot(df):
    prober = widgets.ShapeProber(df, N=4032, K=3520)
    assert len(prober.status.value) > widgets.TITLE_CHARS and "<br>" not in prober.status.value
    lines = prober.figure.layout.title.text.split("<br>")
    assert len(lines) == 2 and all(len(line) <= widgets.TITLE_CHARS for line in lines)
    assert " ".join(lines) == prober.status.value
    assert prober.figure.layout.legend.orientation == "h" and prober.figure.layout.legend.y < 0


def test_typed_sizes_open_that_shape_and_bad_ones_say_what_to_type(prober):
    prober.typed["N"].value = "14336"
    assert prober.status.value == "llama-3-8b.up_proj (N=14336, K=4096): measured"
    assert prober.controls["N"].value == 14336
    drawn = _curves(prober)
    prober.typed["K"].value = "4000"
    assert "K = 4000 is not a multiple of the blocksize 64" in prober.status.value
    assert "type 4032 or 3968" in prober.status.value
    assert _curves(prober) == drawn and prober.controls["K"].value == 4096  # nothing else changed
    prober.typed["K"].value = "four thousand"
    assert "K = 'four thousand' is not a whole number" in prober.status.value
    prober.typed["K"].value = "-64"
    assert "K = -64: it must be positive" in prober.status.value


def test_the_typed_sizes_follow_the_sliders(prober):
    prober.controls["N"].value = 14336
    assert (prober.typed["N"].value, prober.typed["K"].value) == ("14336", "4096")


def test_the_shape_list_holds_every_measured_shape_and_opens_one(prober, df):
    grid = df.filter(pl.col("sweep") == "grid")
    assert sorted(value for _, value in prober.shape_list.options) == sorted(grid["shape"].unique().to_list())
    assert prober.shape_list.value == "llama-3-8b.q_proj"
    prober.controls["N"].value = 14336  # the list follows the shape shown
    assert prober.shape_list.value == "llama-3-8b.up_proj"
    prober.shape_list.value = "gemma-2-9b.q_proj"
    assert prober.status.value == "gemma-2-9b.q_proj (N=4096, K=3584): measured"


def test_dtype_and_quant_start_at_fp16_and_nf4_where_measured_and_must_be_in_the_data(df):
    bf16 = df.filter(pl.col("dtype") == "bf16")
    prober = widgets.ShapeProber(bf16)
    assert (prober.controls["dtype"].value, prober.controls["quant_type"].value) == ("bf16", "nf4")
    assert widgets.ShapeProber(df).controls["dtype"].value == "fp16"
    with pytest.raises(ValueError, match=r"dtype='fp32' is not in the data, which holds \['bf16', 'fp16'\]"):
        widgets.ShapeProber(df, dtype="fp32")


def test_an_unknown_shape_name_is_named_with_close_matches(prober):
    prober.open_shape("llama-3-8b.up_prj")
    assert "unknown shape 'llama-3-8b.up_prj'" in prober.status.value and "llama-3-8b.up_proj" in prober.status.value


def _click(figure: go.FigureWidget, trace_index: int, x, y, point_index) -> None:
    """What the browser sends when a point is clicked (plotly's FigureWidget protocol)."""
    figure._handler_js2py_pointsCallback({"new": {"event_type": "plotly_click", "points": {
        "xs": [x], "ys": [y], "point_indexes": [point_index], "trace_indexes": [trace_index]}}})


def test_clicking_a_crossover_heatmap_cell_opens_that_shape(prober, df):
    crossovers = tables.all_crossovers(df, "simt", ["dequant_blas", "dense"])
    heatmap = widgets.link(plots.crossover_heatmap(crossovers), prober)
    assert isinstance(heatmap, go.FigureWidget)
    column = next(x for x in heatmap.data[1].x if x.startswith("bf16<br>"))  # a dtype, and the baseline under it
    _click(heatmap, 1, column, "llama-3-70b.down_proj", [3, 0])
    assert prober.status.value == "llama-3-70b.down_proj (N=8192, K=28672): measured"
    assert prober.controls["dtype"].value == "bf16"
    assert (prober.controls["N"].value, prober.controls["K"].value) == (8192, 28672)


def test_clicking_a_camping_scatter_point_opens_that_shape(prober, df):
    floors = analysis.camping_floors(df, "simt")
    scatter = widgets.link(plots.camping_scatter(floors, "bf16"), prober)
    index, trace = next((i, t) for i, t in enumerate(scatter.data) if t.name == "normal")
    shape, dtype = trace.customdata[2][0], trace.customdata[2][1]
    _click(scatter, 0, 0, 0, 0)  # the bandwidth model's line: no shape there, nothing opens
    assert prober.status.value == "llama-3-8b.q_proj (N=4096, K=4096): measured"
    _click(scatter, index, trace.x[2], trace.y[2], 2)
    assert prober.status.value.startswith(f"{shape} (N=") and dtype == "bf16" == prober.controls["dtype"].value


class FakeTimer:
    """`bench.time_call` on the CPU without timing anything: every call a fixed 10 µs, counted; the call
    numbered `cancel_at` clicks the prober's cancel button, as a user would while it measures."""

    def __init__(self, cancel_at: int | None = None):
        self.calls, self.cancel_at, self.prober = 0, cancel_at, None
        self.prober_ready = threading.Event()

    def __call__(self, fn, device=None, cold=True, **_):
        fn()
        self.calls += 1
        if self.calls == self.cancel_at:
            self.prober_ready.wait(10)
            self.prober.cancel_button.click()
        return bench.Timing(10.0, 9.9, 10.1, 3, 12.0, "wall_clock", False, 0.0, 0, (9.9, 10.0, 10.1))


def _live_prober(monkeypatch, tmp_path, timer: FakeTimer) -> widgets.ShapeProber:
    """A live prober on the CPU (no GPU here) timing the dense impl with `timer`, logging into tmp_path."""
    monkeypatch.setattr(widgets, "gpu_missing_reason", lambda: None)
    monkeypatch.setattr(bench, "time_call", timer)
    monkeypatch.setattr(bench, "device_gbps", lambda device: 100.0)
    monkeypatch.setattr(bench, "launch_us", lambda device: 5.0)
    prober = widgets.ShapeProber(None, live=True, N=256, K=128, impls=["dense"], log_dir=tmp_path, device="cpu")
    timer.prober = prober
    timer.prober_ready.set()
    prober.wait(60)
    return prober


def test_a_cancelled_live_probe_keeps_its_finished_points_in_memory_and_in_the_log(monkeypatch, tmp_path):
    timer = FakeTimer(cancel_at=10)  # 3 rounds a point, one M at a time: M=1, 2, 4 finished, M=8 begun
    prober = _live_prober(monkeypatch, tmp_path, timer)
    assert timer.calls == 10  # it stopped at the next point
    assert "cancelled; every finished point is kept" in prober.step.value
    assert (prober.progress.value, prober.progress.max) == (3, 8)
    assert prober.status.value == "n256_k128 (N=256, K=128): measured"
    assert _curves(prober)[f"dense · {prober.identity['device']}"][0] == (1, 2, 4)
    assert prober.cancel_button.disabled
    (log,) = tmp_path.glob("probe-cpu-*.jsonl")
    assert log == prober.log
    logged = runlog.finished_rows(runlog.read_log(log))
    assert sorted(logged["M"]) == [1, 2, 4] and logged["device"].unique().to_list() == [prober.identity["device"]]
    assert sum(r["kind"] == "round" for r in runlog.read_log(log)) == 10  # the begun point's round too

    again = FakeTimer()
    second = _live_prober(monkeypatch, tmp_path, again)  # a new prober on this machine: the earlier probes
    assert again.calls == 8 * 3 - 10  # it measured only what was missing, the begun point's round kept
    assert sorted(second.probed["M"]) == [1, 2, 4, 8, 16, 32, 64, 128]
    assert second.step.value == "N=256, K=128: done"


def test_a_live_prober_shows_each_step_and_saves_its_probes_as_a_dataset(monkeypatch, tmp_path):
    timer = FakeTimer()
    steps = []
    monkeypatch.setattr(widgets.ShapeProber, "_show_step",
                        lambda self, line, done, total: steps.append((line, done, total)))
    prober = _live_prober(monkeypatch, tmp_path, timer)
    assert steps[0] == ("N=256, K=128: measuring bandwidth and launch", 0, 8)
    assert steps[1:] == [(f"N=256, K=128: point {k} of 8", k, 8) for k in range(1, 9)]
    saved = prober.save(tmp_path / "probes.parquet")
    from q4lab import dataset
    rows = dataset.load(saved)
    assert rows.height == 8 and set(rows["run_id"]) <= {r["run_id"] for r in runlog.read_log(prober.log)}
    assert rows["device_gbps"].unique().to_list() == [100.0] and rows["launch_us"].unique().to_list() == [5.0]
    prober.save_button.click()
    assert prober.step.value == f"saved {prober.log.with_suffix('.parquet')}: q4lab report --data " \
                                f"{prober.log.with_suffix('.parquet')}"


def test_the_frame_takes_in_each_new_probe_and_is_not_rebuilt_by_reading_it(monkeypatch, tmp_path):
    prober = _live_prober(monkeypatch, tmp_path, FakeTimer())
    assert prober.frame is prober.frame                  # joined once where the probes change, not per read
    assert set(prober.frame.select("N", "M").iter_rows()) == {(256, m) for m in widgets.LIVE_MS}
    prober.open(320, 128)
    prober.wait(60)
    assert prober.status.value == "n320_k128 (N=320, K=128): measured"
    assert set(prober.frame.select("N", "M").iter_rows()) == {(n, m) for n in (256, 320) for m in widgets.LIVE_MS}
    assert prober.frame.equals(prober.probed)            # no dataset rows: the frame is the probes
    assert [name for _, name in prober.shape_list.options] == ["n256_k128", "n320_k128"]  # its readers see it


def test_saving_before_any_probe_says_so(monkeypatch, tmp_path, df):
    monkeypatch.setattr(widgets, "gpu_missing_reason", lambda: None)
    prober = widgets.ShapeProber(df, live=False)
    with pytest.raises(ValueError, match="nothing probed on this device yet"):
        prober.save()


@pytest.mark.gpu
@pytest.mark.slow
def test_on_a_gpu_two_live_probes_are_there_for_the_next_prober_without_measuring(tmp_path, monkeypatch):
    from q4lab import sweep
    first = widgets.ShapeProber(None, live=True, N=4096, K=4096, impls=["simt", "dequant_blas"], log_dir=tmp_path)
    first.wait(600)
    first.open(5120, 4096)
    first.wait(600)
    assert first.status.value.endswith("(N=5120, K=4096): measured"), first.step.value
    shapes = {(4096, 4096), (5120, 4096)}
    expected = {(n, k, impl, m) for n, k in shapes for impl in ("simt", "dequant_blas") for m in widgets.LIVE_MS}
    on_disk = runlog.finished_rows(runlog.read_log(first.log))
    assert set(on_disk.select("N", "K", "impl", "M").iter_rows()) == expected
    assert (on_disk["device"] == first.identity["device"]).all() and (on_disk["time_us"] > 0).all()

    def measure(*args, **kwargs):
        raise AssertionError("the second prober measured again what the log holds")

    monkeypatch.setattr(sweep, "run_grid", measure)
    second = widgets.ShapeProber(None, live=True, N=4096, K=4096, impls=["simt", "dequant_blas"], log_dir=tmp_path)
    second.wait(60)
    assert second.log == first.log
    assert set(second.probed.select("N", "K", "impl", "M").iter_rows()) == expected
    for n, k in shapes:
        second.open(n, k)
        second.wait(60)
        assert second.status.value.endswith(f"(N={n}, K={k}): measured")
        assert all(len(x) == len(widgets.LIVE_MS) for x, _ in _curves(second).values())
    assert "failed" not in second.step.value
