"""The shape prober driven headless: set a control's value, read the figure."""
import plotly.graph_objects as go
import polars as pl
import pytest

from q4lab import widgets
from q4lab.synthetic import DEVICES, synthetic_dataset

H100 = DEVICES["H100"]["device"]


@pytest.fixture(scope="module")
def df():
    return synthetic_dataset(nsweep=None)


@pytest.fixture
def prober(df):
    return widgets.ShapeProber(df, N=4096, K=4096)


def _curves(prober) -> dict[str, tuple]:
    return {t.name: (tuple(t.x), tuple(t.y)) for t in prober.figure.data}


def test_starts_on_the_requested_measured_shape(prober):
    assert prober.status.value == "llama-3-8b.q_proj (N=4096, K=4096): measured"
    assert prober.figure.layout.title.text == prober.status.value
    assert len(prober.figure.data) == 9  # 5 impls on the H100, 4 on the gfx1201 (no bnb)
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
    assert type(snapshot) is go.Figure and snapshot.layout.title.text == prober.status.value
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


def test_live_on_a_gpu_measures_the_requested_shape_once(df, monkeypatch):
    calls = []

    def run_grid(shapes, ms, dtypes, impls, quant_types, progress):
        (shape,) = shapes
        calls.append((shape.N, shape.K, sorted(impls)))
        rows = df.filter(pl.col("shape") == "llama-3-8b.q_proj", pl.col("impl").is_in(list(impls)),
                         pl.col("M").is_in(list(ms)), pl.col("dtype").is_in(list(dtypes)), pl.col("device") == H100)
        return rows.with_columns(pl.lit(shape.name).alias("shape"), pl.lit(shape.N, pl.Int64).alias("N"),
                                 pl.lit(shape.K, pl.Int64).alias("K"))

    import q4lab.sweep
    monkeypatch.setattr(widgets, "gpu_missing_reason", lambda: None)
    monkeypatch.setattr(q4lab.sweep, "run_grid", run_grid)
    prober = widgets.ShapeProber(df.filter(pl.col("device") == H100), live=True, N=5000, K=4096,
                                 impls=["simt", "dequant_blas"])
    assert calls == [(5000, 4096, ["dequant_blas", "simt"])]
    assert (prober.controls["N"].min, prober.controls["N"].step) == (64, 64)  # live: any N, measured on request
    assert prober.status.value == "n5000_k4096 (N=5000, K=4096): measured"
    prober.controls["device"].value = H100  # a redraw with nothing new to measure
    assert len(calls) == 1
