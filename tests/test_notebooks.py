"""Every notebook runs through papermill on a synthetic dataset and shows what the data holds; bad
parameters fail the run, naming the parameter."""
import json
import re
from concurrent.futures import ThreadPoolExecutor

import nbformat
import papermill
import polars as pl
import pytest
from papermill.exceptions import PapermillExecutionError
from plotly.offline import get_plotlyjs

from q4lab import analysis, dataset, dispatch, notebook_io as nbio, report
from q4lab.synthetic import NSWEEP, synthetic_dataset

REPO = nbio.REPO
NOTEBOOKS = report.NOTEBOOKS
NARROW_SHAPES = ["llama-3-8b.q_proj", "llama-3.2-1b.q_proj"]
SMALL = {  # small parameters: the runs stay quick, and what they show is known
    "crossover": {"dtypes": ["fp16"], "shapes": NARROW_SHAPES},
    "camping_outliers": {"z_threshold": 3.5, "live": True},  # no GPU here: it must say so and use the data
    "n_resonance": {"n_start": 2048, "n_stop": 12288},
    "shape_probe": {"N": 14336, "impls": ["simt", "dequant_blas"]},
    "devices": {"baselines": ["dequant_blas"], "dtypes": ["fp16"]},
    "dispatch": {"dtypes": ["fp16"], "kinds": ["single", "shape"], "model": "llama-3-70b", "batch": [1, 3, 8]},
}
BAD = {  # run name -> (notebook, parameters)
    "unknown": ("camping_outliers", {"z_treshold": 5.0}),
    "ill_typed": ("n_resonance", {"K": "4096"}),
    "misspelt_shape": ("crossover", {"shapes": ["llama-3-8b.q_prj"]}),
}
DEFAULTS = {"crossover_defaults": ("crossover", {})}  # every dtype, baseline and shape the data holds
PLOTLY_JS_HEAD = get_plotlyjs()[:200]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    frame = synthetic_dataset(nsweep={**NSWEEP, "ms": (1, 8)})  # two (K, M) sweeps
    path = tmp_path_factory.mktemp("data") / "synthetic.parquet"
    frame.write_parquet(path)
    return frame, path


@pytest.fixture(scope="module")
def runs(synthetic, tmp_path_factory):
    """All notebook runs at once (most of a run is kernel start-up): name -> executed notebook or error."""
    _, path = synthetic
    out = tmp_path_factory.mktemp("executed")
    jobs = {name: (name, params) for name, params in SMALL.items()} | BAD | DEFAULTS

    def run(job):
        name, (notebook, params) = job
        try:
            papermill.execute_notebook(str(REPO / "notebooks" / f"{notebook}.ipynb"), str(out / f"{name}.ipynb"),
                                       parameters={"data": str(path), **params, **export_to(out / name, notebook)},
                                       kernel_name="python3", kernel_manager_class=report.SocketFileKernelManager,
                                       cwd=str(REPO), progress_bar=False)
        except PapermillExecutionError as err:
            return name, err
        return name, nbformat.read(out / f"{name}.ipynb", as_version=4)

    with report.kernel_environment(), ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        return dict(pool.map(run, jobs.items())) | {"_out": out}


def export_to(folder, notebook: str) -> dict:
    return {"export_dir": str(folder)} if "export_dir" in nbio.declared_parameters(REPO / "notebooks" / f"{notebook}.ipynb") else {}


def _outputs(notebook, mime: str) -> list[str]:
    """Every output of that mime type, as text (JSON outputs serialized)."""
    data = [o["data"][mime] for cell in notebook.cells if cell.cell_type == "code"
            for o in cell.outputs if mime in o.get("data", {})]
    return [d if isinstance(d, str) else json.dumps(d, ensure_ascii=False) for d in data]


def _ran(runs, name):
    result = runs[name]
    if isinstance(result, Exception):
        pytest.fail(f"{name}.ipynb failed: {result}")
    return result


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_and_embeds_plotly_once(runs, name):
    notebook = _ran(runs, name)
    html = "".join(_outputs(notebook, "text/html"))
    assert html.count(PLOTLY_JS_HEAD) == 1  # plotly.js inline, once: the report renders offline
    assert html.count("Plotly.newPlot") >= 1
    assert len(_outputs(notebook, "application/vnd.plotly.v1+json")) == html.count("Plotly.newPlot")
    assert not re.search(r"<script[^>]*src=[\"']https?:", html)


@pytest.mark.slow
def test_crossover_shows_the_planted_crossovers_and_the_median(runs, synthetic, tmp_path_factory):
    frame, _ = synthetic
    notebook = _ran(runs, "crossover")
    figures, html = "".join(_outputs(notebook, "application/vnd.plotly.v1+json")), "".join(_outputs(notebook, "text/html"))
    assert '"24"' in figures and '"M* vs dequant_blas = 24"' in figures  # heatmap cell, selector marker
    # `shapes` narrows everything: the headline's median is over the two shapes, the menu offers those two
    narrowed = frame.filter(pl.col("dtype") == "fp16", pl.col("shape").is_in(NARROW_SHAPES))
    recorded = [r for r in nbio.recorded(notebook)["summaries"] if r["impl_b"] == "dequant_blas"]
    expected = analysis.crossover_summary(narrowed)
    assert sorted((r["device"], r["n_shapes"], r["median_label"], r["threshold_m"]) for r in recorded) == sorted(
        expected.select("device", "n_shapes", "median_label", "threshold_m").iter_rows())
    assert {r["n_shapes"] for r in recorded} == {2}
    selector = next(json.loads(f) for f in _outputs(notebook, "application/vnd.plotly.v1+json") if '"updatemenus"' in f)
    assert [b["label"].split(" ")[0] for b in selector["layout"]["updatemenus"][0]["buttons"]] == sorted(
        NARROW_SHAPES, key=lambda s: ("3.2-1b" not in s))
    per_shape = pl.read_csv(runs["_out"] / "crossover" / "crossover_per_shape.csv")
    assert per_shape.height == 2 * 2 and set(per_shape["shape"]) == set(NARROW_SHAPES)  # devices x shapes, fp16
    assert 'href="crossover_per_shape.csv"' in html and 'href="crossover_pivot.parquet"' in html


@pytest.mark.slow
def test_devices_compares_the_two_cards_shape_by_shape(runs, synthetic):
    frame, _ = synthetic
    notebook = _ran(runs, "devices")
    figures = "".join(_outputs(notebook, "application/vnd.plotly.v1+json"))
    assert "B = NVIDIA H100 80GB HBM3 (synthetic) over A = AMD Radeon RX 9070 XT (synthetic)" in figures
    kept = nbio.recorded(notebook)
    comparison, shift = pl.DataFrame(kept["comparison"]), pl.DataFrame(kept["shift"])
    assert comparison.height == frame.filter(pl.col("sweep") == "grid", pl.col("dtype") == "fp16").select("shape", "M").n_unique()
    assert set(shift["baseline"]) == {"dequant_blas"}
    q_proj = shift.filter(pl.col("shape") == "llama-3-8b.q_proj").row(0, named=True)
    assert q_proj["shift"] == pytest.approx(1 / 0.75)  # the planted M* scale between the two cards
    assert (runs["_out"] / "devices" / "crossover_shift.csv").is_file()
    disagree = pl.read_parquet(runs["_out"] / "devices" / "device_disagreements.parquet")  # one card an arch: none
    assert disagree.is_empty() and disagree.columns == dispatch.disagreements(frame).columns
    gain = pl.DataFrame(kept["card_trees"])  # one card an arch: its own trees are its arch's
    assert sorted(gain["device"]) == sorted(frame["device"].unique()) and gain["own_worst"].to_list() == gain["arch_worst"].to_list()


@pytest.mark.slow  # the module's notebook runs
def test_crossover_defaults_cover_every_dtype_baseline_and_shape(runs, synthetic):
    frame, _ = synthetic
    notebook = _ran(runs, "crossover_defaults")
    heatmap = next(json.loads(f) for f in _outputs(notebook, "application/vnd.plotly.v1+json") if '"heatmap"' in f)
    assert heatmap["data"][0]["x"] == [f"{t}<br>vs {b}" for b in ("bnb", "dense", "dequant_blas", "gemv") for t in ("bf16", "fp16")]
    assert len(heatmap["data"][0]["y"]) == frame.filter(pl.col("sweep") == "grid")["shape"].n_unique()
    pivot = pl.read_csv(runs["_out"] / "crossover_defaults" / "crossover_pivot.csv")
    assert set(pivot["baseline"]) == {"bnb", "dense", "dequant_blas", "gemv"} and {"bf16", "fp16"} <= set(pivot.columns)


@pytest.mark.slow
def test_camping_outliers_names_the_floors_and_the_wave_tail(runs, synthetic):
    frame, _ = synthetic
    notebook = _ran(runs, "camping_outliers")
    printed = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs)
    assert "live=True, but this machine has no usable GPU" in printed and "showing the dataset" in printed
    floors_kept = pl.DataFrame(nbio.recorded(notebook)["floors"])
    labelled = {(r["device"].split(" ")[0], r["dtype"], r["shape"]): (r["label"], r["m_floor"], round(r["floor_us"]))
                for r in floors_kept.filter(pl.col("label") != "normal").iter_rows(named=True)}
    for dtype in ("bf16", "fp16"):  # the planted floors (the unstable one never labelled), the wave tail
        assert labelled[("AMD", dtype, "llama-3.2-1b.q_proj")] == ("camping", 8, 27)
        assert labelled[("NVIDIA", dtype, "llama-3-8b.kv_proj")] == ("camping", 4, 10)
        assert labelled[("NVIDIA", dtype, "probe.narrow_wide")][0] == "wave_tail"
        assert ("AMD", dtype, "llama-3-8b.q_proj") not in labelled
    assert {s for (_, _, s), (label, _, _) in labelled.items() if label == "slow_not_flat"} == {"llama-3-70b.down_proj"}
    floors = pl.read_csv(runs["_out"] / "camping_outliers" / "camping_floors.csv")
    assert set(floors["dtype"]) == {"bf16", "fp16"}  # every dtype by default
    assert set(floors.filter(pl.col("label") == "slow_not_flat")["shape"]) == {"llama-3-70b.down_proj"}
    inversions = pl.read_parquet(runs["_out"] / "camping_outliers" / "camping_m_inversions.parquet")
    assert inversions.is_empty() and inversions.columns == analysis.m_inversions(frame, "simt").columns  # times grow with M


@pytest.mark.slow
def test_n_resonance_finds_the_planted_families_in_the_chosen_range(runs):
    notebook = _ran(runs, "n_resonance")
    families = pl.DataFrame(nbio.recorded(notebook)["families"])
    strongest = analysis.strongest_family(families)
    # N from 2048 to 12288 holds 6 multiples of 2048 (gfx1201's planted family) and 4 of 3072 (the H100's)
    for m in (1, 8):  # every swept (K, M) pair by default
        found = {(r["family"], r["n_flagged"], r["n_in_family"])
                 for r in strongest.filter(pl.col("K") == 4096, pl.col("M") == m).iter_rows(named=True)}
        assert found == {("mult_2048", 6, 6), ("mult_3072", 4, 4)}, m


@pytest.mark.slow
def test_shape_probe_shows_the_widget_and_a_static_snapshot(runs):
    notebook = _ran(runs, "shape_probe")
    assert _outputs(notebook, "application/vnd.jupyter.widget-view+json")
    (snapshot,) = _outputs(notebook, "application/vnd.plotly.v1+json")
    assert "llama-3-8b.up_proj (N=14336, K=4096): measured (fp16, nf4)" in snapshot  # names what it shows
    assert "simt · " in snapshot and "gemv · " not in snapshot


@pytest.mark.slow
def test_dispatch_records_held_out_regret_transfer_and_the_roll_up(runs, synthetic):
    frame, _ = synthetic
    notebook, out = _ran(runs, "dispatch"), runs["_out"] / "dispatch"
    grid = frame.filter(pl.col("sweep") == "grid", pl.col("dtype") == "fp16")
    recorded = pl.read_parquet(out / "dispatch_regret.parquet")
    expected = dispatch.cross_validate(grid, ["single", "shape"], by=("device", "dtype", "kind"))
    assert recorded.sort("device", "kind").equals(expected.sort("device", "kind"))
    h100 = {r["kind"]: r for r in recorded.iter_rows(named=True) if r["device"].startswith("NVIDIA")}
    assert h100["shape"]["mean"] < h100["single"]["mean"]
    shipped = pl.read_parquet(out / "dispatch_shipped.parquet")  # the shipped rule covers sm_90 only
    assert shipped.equals(dispatch.summarize(dispatch.regret(dispatch.load_rule(), grid), ("device", "dtype")))
    assert shipped.filter(pl.col("device").str.starts_with("AMD"))["n_points"].sum() == 0
    assert shipped.filter(pl.col("device").str.starts_with("NVIDIA"))["n_points"].sum() > 0
    transfer = pl.read_parquet(out / "dispatch_transfer.parquet")
    assert transfer.height == 2 * 2 * 2  # kinds x fitted on x scored on
    rolled = pl.read_parquet(out / "dispatch_rollup.parquet")
    assert rolled.filter(pl.col("M") == 3)["interpolated"].all() and not rolled.filter(pl.col("M") == 8)["interpolated"].any()
    rule = dispatch.fit(grid, kind="shape")
    assert rolled.equals(dispatch.rollup(grid, rule, "llama-3-70b", [1, 3, 8]))
    html = "".join(_outputs(notebook, "text/html"))
    assert "NF4 llama-3-70b at batch 3 on NVIDIA H100 80GB HBM3 (synthetic) (fp16): auto" in html
    assert "interpolated in log-log space between measured batch sizes" in html


@pytest.mark.parametrize("run, error, name, kind", [
    ("unknown", "ParameterError", "z_treshold", "unknown parameter"),
    ("ill_typed", "ParameterError", "'K'", "must be int"),
    ("misspelt_shape", "ValueError", "shape ['llama-3-8b.q_prj'] not in the data", "did you mean ['llama-3-8b.q_proj']?")])
@pytest.mark.slow
def test_a_bad_parameter_fails_the_run_naming_it(runs, run, error, name, kind):
    err = runs[run]
    assert isinstance(err, PapermillExecutionError), f"the {run} parameter did not fail the run"
    assert err.ename == error and name in err.evalue and kind in err.evalue


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_parameters_are_typed_and_explained(name):
    path = REPO / "notebooks" / f"{name}.ipynb"
    params = papermill.inspect_notebook(str(path))
    assert "data" in params and "live" in params
    for param in params.values():
        assert param["inferred_type_name"] != "None" and param["help"], f"{name}: {param['name']} lacks a type or help"
    notebook = nbformat.read(path, as_version=4)
    tagged = [i for i, c in enumerate(notebook.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and "nbio.check(globals())" in notebook.cells[tagged[0] + 1].source
    code = "\n".join(c.source for c in notebook.cells if c.cell_type == "code")
    assert not re.search(r"^\s*(def|class) |lambda", code, re.M)  # notebooks call the package, nothing more


def test_the_default_data_with_no_dataset_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(nbio, "REPO", tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(dataset.DatasetError, match=r"no dataset matches 'data/\*.parquet'.*`q4lab sweep`.*data=PATH"):
        nbio.load("data/*.parquet")
    with pytest.raises(dataset.DatasetError, match="no dataset given: name at least one"):
        nbio.load([])


def test_relative_data_is_also_found_from_the_repository_root(synthetic, tmp_path, monkeypatch):
    frame, path = synthetic
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.parquet").write_bytes(path.read_bytes())
    monkeypatch.setattr(nbio, "REPO", tmp_path)
    monkeypatch.chdir(tmp_path / "data")  # as a notebook opened in JupyterLab: cwd is a subfolder
    assert nbio.load("data/*.parquet").height == frame.height


def test_parameter_checks_in_process():
    ok = {"__annotations__": {"data": str | list, "z": float, "n": int, "live": bool, "dtypes": list[str]},
          "data": ["a.parquet"], "z": 3, "n": 2, "live": False, "dtypes": ("fp16",),
          "In": ["", "# Parameters\nz = 3\n"]}
    assert nbio.check(ok)["z"] == 3
    for name, value in [("n", True), ("live", 1), ("dtypes", "fp16"), ("dtypes", [1]), ("data", 3), ("z", "3")]:
        with pytest.raises(nbio.ParameterError, match=f"parameter '{name}'"):
            nbio.check({**ok, name: value})
    with pytest.raises(nbio.ParameterError, match=r"unknown parameter\(s\) \['bogus'\]"):
        nbio.check({**ok, "In": ["", "# Parameters\nbogus = 1\n"]})
    with pytest.raises(nbio.ParameterError, match=r"\['dtype'\] \(did you mean 'dtypes' for 'dtype'\?\)"):
        nbio.check({**ok, "In": ["", "# Parameters\ndtype = 'fp32'\n"]})
    with pytest.raises(nbio.ParameterError, match=r"must be list\[str\]; pass a list as YAML: papermill \.\.\. "
                                                  r"-y 'dtypes: \[fp32\]'.*-p 'NOTEBOOK.dtypes=\[fp32\]'"):
        nbio.check({**ok, "dtypes": "fp32"})


def test_live_on_a_gpu_measures_through_the_sweep(monkeypatch):
    import q4lab.sweep

    calls = []
    monkeypatch.setattr(nbio, "gpu_missing_reason", lambda: None)
    monkeypatch.setattr(q4lab.sweep, "run_nsweep", lambda **kw: calls.append(kw) or "measured")
    args = {"K": 4096, "ms": [1], "n_start": 1024, "n_stop": 2048, "n_step": 64, "impls": ["simt"]}
    assert nbio.load_or_measure("unused.parquet", True, "nsweep", **args) == "measured" and calls == [args]


@pytest.mark.parametrize("name", ["crossover", "devices", "camping_outliers", "n_resonance"])
def test_static_text_names_nothing_a_parameter_or_the_data_picks(name):
    """Markdown stays true whatever the parameters: no impl, dtype or largest M written into it (the line
    under the title, computed from the data, says what the page covers)."""
    notebook = nbformat.read(REPO / "notebooks" / f"{name}.ipynb", as_version=4)
    text = "\n".join(c.source for c in notebook.cells if c.cell_type == "markdown")
    assert not re.search(r"dequant_blas|dequantize, then BLAS|\bfp16\b|\bbf16\b|> ?128|\bH100\b", text)
