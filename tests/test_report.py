"""`q4lab report`: every notebook to offline HTML, an index with the headline findings, a failing notebook
reported without stopping the others; and a real browser renders the plots with no network."""
import argparse
import html
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import polars as pl
import pytest
from plotly.offline import get_plotlyjs

from q4lab import analysis, cli, dataset, headlines, report
from q4lab.synthetic import synthetic_dataset

CHROMIUM = "/usr/bin/chromium"
PARAMETERS = {"crossover": {"dtypes": ["fp16"], "shapes": ["llama-3-8b.q_proj"]},
              "n_resonance": {"K": 1234}}  # no N-sweep at K=1234: this notebook fails, the others must not


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    # measured, as far as the reports can tell, with kernels that are not today's
    frame = synthetic_dataset().with_columns(kernel_hash=pl.lit("0123456789abcdef"), git_commit=pl.lit("92d8d9063a18"))
    data = tmp_path_factory.mktemp("data") / "synthetic.parquet"
    frame.write_parquet(data)
    out = tmp_path_factory.mktemp("reports")
    lines = []
    results = report.build_reports(out, str(data), parameters=PARAMETERS, log=lambda line, **_: lines.append(line),
                                   progress_s=2)
    return frame, out, {r.name: r for r in results}, lines


class _Sources(HTMLParser):
    """src/href of every tag (script bodies, e.g. plotly.js with its attribution links, are not tags)."""

    def __init__(self):
        super().__init__()
        self.urls = []

    def handle_starttag(self, tag, attrs):
        self.urls += [(tag, value) for name, value in attrs if name in ("src", "href") and value]


def _network_references(page: str) -> list:
    parser = _Sources()
    parser.feed(page)
    # a link (<a href>) is only followed when clicked, e.g. itables' <noscript> credit; anything else loads
    found = [(tag, url) for tag, url in parser.urls if tag != "a" and re.match(r"(https?:)?//", url)]
    return found + re.findall(r"@import\s+url\(\s*['\"]?https?:[^)]*\)", page)


@pytest.mark.slow
def test_every_notebook_has_a_report_and_the_failure_is_named(built):
    _, out, results, lines = built
    assert sorted(results) == sorted(report.NOTEBOOKS)
    for name, result in results.items():
        assert result.html == out / f"{name}.html" and result.html.is_file()
        assert (result.error is None) == (name != "n_resonance"), (name, result.error)
    error = results["n_resonance"].error
    assert re.match(r"cell \d+ \(In \[\d+\]: frame = nbio.load_or_measure\(.*\): ValueError: K \[1234\] not in the data", error)
    assert any("n_resonance: FAILED at cell" in line for line in lines)
    assert any(line.startswith("  crossover: ok in") for line in lines)
    assert "  crossover: running" in lines and any(line.startswith("  still running: ") for line in lines)
    assert "Synthetic data" in (out / "index.html").read_text()


@pytest.mark.slow
def test_reports_have_their_plots_once_offline_and_no_code(built):
    _, out, results, _ = built
    plotly_js = get_plotlyjs()[:200]
    for name in ("crossover", "camping_outliers", "shape_probe", "n_resonance"):
        page = results[name].html.read_text()
        assert _network_references(page) == [], name
        if name != "n_resonance":  # (the failed one shows its traceback, code included)
            assert "nbio.check(globals())" not in page and "load_or_measure(" not in page  # no input cells
            assert page.count(plotly_js) == 1 and page.count("Plotly.newPlot") >= 1, name
    assert "interactive widget" in results["shape_probe"].html.read_text()
    failed = results["n_resonance"].html.read_text()
    assert "not in the data" in failed  # the error is in the report, for the reader


@pytest.mark.slow
def test_index_links_the_reports_and_states_the_headlines(built):
    frame, out, _, _ = built
    index = (out / "index.html").read_text()
    assert _network_references(index) == []
    for name in report.NOTEBOOKS:
        assert f'<a href="{name}.html">{name}</a>' in index
    assert "FAILED: cell" in index and index.count("Plotly.newPlot") == 1
    summary = analysis.crossover_summary(frame)
    for row in summary.iter_rows(named=True):  # the median crossover per device and dtype
        assert f"{row['device']} · {row['dtype']} · nf4: simt beats dequant_blas up to M* = {row['median_label']} " in index
    assert index.count("1 camping outlier(s) of 18 shapes") == 4  # two devices x two dtypes
    assert "strongest family mult_2048" in index and "strongest family mult_3072" in index
    assert "18 unstable row(s)" in index
    for device in frame["device"].unique():  # where the rows come from, as a table with the names unquoted
        assert f"<td>{device}</td>" in index
    assert "<h2>Method</h2>" in index and all(html.escape(line) in index for line in headlines.method(frame))


@pytest.mark.slow
def test_every_page_names_the_kernel_version_and_flags_the_changed_kernels(built):
    _, out, results, _ = built
    stale = "measured with kernels 01234567 at 92d8d90; the kernels have changed since: re-run `q4lab sweep"
    index = (out / "index.html").read_text()
    assert index.count(stale) == 2 and index.index("Stale data:") < index.index("<h2>Reports")  # two devices
    for result in results.values():
        page = result.html.read_text()
        assert page.count(stale) == 2 and page.index("Stale data:") < page.index("<h1"), result.name


def test_no_dataset_fails_before_any_notebook_with_what_to_do(tmp_path, capsys):
    with pytest.raises(dataset.DatasetError, match=r"`q4lab sweep`.*data=PATH"):
        report.build_reports(tmp_path / "r", str(tmp_path / "none" / "*.parquet"))
    assert not (tmp_path / "r").exists()
    assert cli.main(["report", "--data", str(tmp_path / "none.parquet"), "--out", str(tmp_path / "r")]) == 2
    assert "q4lab report: error: no dataset matches" in capsys.readouterr().err


def test_report_command_exits_nonzero_when_a_notebook_failed(monkeypatch, capsys):
    failed = report.NotebookResult("n_resonance", Path("n_resonance.html"), 1.0, "cell 3 (In [3]: x): ValueError: boom")
    ok = report.NotebookResult("crossover", Path("crossover.html"), 1.0)
    monkeypatch.setattr(report, "build_reports", lambda *a, **k: [ok, failed])
    args = argparse.Namespace(out="r", data=["d"], only=list(report.NOTEBOOKS), timeout=10, jobs=1, live="no",
                              parameters=[])
    assert report.report_command(args) == 1
    assert "n_resonance failed at cell 3 (In [3]: x): ValueError: boom" in capsys.readouterr().err
    monkeypatch.setattr(report, "build_reports", lambda *a, **k: [ok])
    assert report.report_command(args) == 0


def test_parameters_for_a_notebook_not_run_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"parameters for notebooks \['crossvoer'\]"):
        report.build_reports(tmp_path, "x", notebooks=("crossover",), parameters={"crossvoer": {}})


@pytest.mark.slow
@pytest.mark.browser
def test_a_real_browser_renders_the_index_and_a_report_offline(built):
    if not Path(CHROMIUM).exists() or shutil.which("chromium") is None:
        pytest.skip(f"NO BROWSER CHECK: {CHROMIUM} is missing (apt-get install chromium; `make test` does)")
    from playwright.sync_api import sync_playwright

    _, out, _, _ = built
    requests, errors = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page()
            page.on("request", lambda r: requests.append(r.url))
            page.on("pageerror", lambda e: errors.append(str(e)))
            for name, plots in (("index", 1), ("crossover", 3), ("devices", 1)):
                page.goto((out / f"{name}.html").as_uri())
                page.wait_for_selector(".main-svg", timeout=30_000)
                assert page.locator(".js-plotly-plot").count() == plots, name
                assert page.locator(".main-svg .trace, .heatmaplayer image").count() > 0, name  # drawn, not a frame
        finally:
            browser.close()
    assert errors == []
    assert [u for u in requests if not u.startswith(("file://", "data:", "about:", "blob:"))] == []


def test_live_reports_only_when_asked_or_a_gpu_is_there(monkeypatch):
    assert report.live_parameters("no", ("crossover",)) is None
    assert report.live_parameters("yes", ("crossover", "n_resonance")) == {"crossover": {"live": True},
                                                                         "n_resonance": {"live": True}}
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    assert report.live_parameters("auto", ("shape_probe",)) == {"shape_probe": {"live": True}}
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert report.live_parameters("auto", ("shape_probe",)) is None


def test_widget_views_become_a_note_without_their_text_fallback():
    import nbformat
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("w", outputs=[
        nbformat.v4.new_output("display_data", data={"text/plain": "VBox(children=(IntSlider(value=4096))",
                                                     "application/vnd.jupyter.widget-view+json": {"model_id": "x"}}),
        nbformat.v4.new_output("display_data", data={"text/html": "<div>snapshot</div>"})])])
    report._replace_widget_views(nb)
    assert [o["data"] for o in nb.cells[0].outputs] == [{"text/html": report.WIDGET_NOTE},
                                                        {"text/html": "<div>snapshot</div>"}]


def test_report_parameters_go_to_one_notebook_or_every_one_that_takes_them():
    found = report.parse_parameters(["crossover.dtypes=fp32", "n_resonance.K=8192", "z_threshold=5",
                                     "dtypes=[fp16, bf16]"], report.NOTEBOOKS)
    assert found == {"crossover": {"dtypes": ["fp16", "bf16"]}, "devices": {"dtypes": ["fp16", "bf16"]},
                     "n_resonance": {"K": 8192, "dtypes": ["fp16", "bf16"]},
                     "camping_outliers": {"z_threshold": 5, "dtypes": ["fp16", "bf16"]},
                     "dispatch": {"dtypes": ["fp16", "bf16"]}}  # the later -p wins
    assert report.parse_parameters([], report.NOTEBOOKS) == {}


@pytest.mark.parametrize("spec, message", [
    ("crossover.dtype=fp32", r"notebook 'crossover' takes no parameter 'dtype' \(did you mean 'dtypes'\?\)"),
    ("dtyeps=fp32", r"no notebook takes a parameter 'dtyeps' \(did you mean 'dtypes'\?\)"),
    ("crosover.dtypes=fp32", r"no notebook 'crosover' in this run \(did you mean 'crossover'\?\)"),
    ("n_resonance.K=abc", r"n_resonance.K must be int, got 'abc'; write it as YAML, e.g. -p 'n_resonance.K=\d+'"),
    ("crossover.dtypes={a: 1}", r"crossover.dtypes must be list\[str\].*-p 'crossover.dtypes=\[.*\]'"),
    ("K", r"write NOTEBOOK.NAME=VALUE or NAME=VALUE, e.g. -p 'crossover.dtypes=\[fp32\]'"),
])
def test_a_bad_report_parameter_says_what_is_accepted(spec, message):
    with pytest.raises(ValueError, match=message):
        report.parse_parameters([spec], report.NOTEBOOKS)


def test_report_command_checks_parameters_before_running_anything(monkeypatch, capsys):
    monkeypatch.setattr(report, "build_reports", lambda *a, **k: pytest.fail("ran with a bad parameter"))
    assert cli.main(["report", "--live", "no", "-p", "crossover.dtype=fp32"]) == 2
    assert "did you mean 'dtypes'?" in capsys.readouterr().err
    seen = {}
    monkeypatch.setattr(report, "build_reports", lambda *a, **k: seen.update(parameters=a[3], jobs=k["jobs"]) or [])
    assert cli.main(["report", "--live", "yes", "-p", "crossover.dtypes=fp32", "-p", "n_resonance.K=8192"]) == 0
    assert seen["parameters"]["crossover"] == {"live": True, "dtypes": ["fp32"]} and seen["jobs"] == 1
    assert seen["parameters"]["n_resonance"] == {"live": True, "K": 8192}


def test_a_relative_out_folder_reaches_the_notebooks_absolute(tmp_path, monkeypatch):
    """papermill changes the whole process's working directory while a notebook runs, so a relative path
    handed to a notebook run (or written beside one) would land elsewhere."""
    data = tmp_path / "d.parquet"
    synthetic_dataset(devices=("H100",), dtypes=("fp16",), nsweep=None).write_parquet(data)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    seen = []

    def fake_run(name, out, params, *args, **kwargs):
        seen.append((out, params["export_dir"]))
        return report.NotebookResult(name, out / f"{name}.html", 0.0)

    monkeypatch.setattr(report, "run_notebook", fake_run)
    report.build_reports("rel", str(data), notebooks=("crossover",), log=lambda *a, **k: None)
    assert seen == [(tmp_path / "elsewhere" / "rel", str(tmp_path / "elsewhere" / "rel"))]
    assert (tmp_path / "elsewhere" / "rel" / "index.html").is_file()


def test_kernels_started_together_each_bind_their_own_sockets_and_leave_nothing():
    """Over TCP a kernel's ports could be taken by another kernel starting at the same moment; each kernel
    here gets socket files of its own name, in a folder removed afterwards."""
    import asyncio

    async def start_execute_stop(managers):
        await asyncio.gather(*(km.start_kernel() for km in managers))
        try:
            clients = [km.client() for km in managers]
            for client in clients:
                client.start_channels()
            await asyncio.gather(*(client.wait_for_ready(timeout=60) for client in clients))
            replies = await asyncio.gather(*(client.execute_interactive("6 * 7", timeout=60) for client in clients))
            return [reply["content"]["status"] for reply in replies]
        finally:
            await asyncio.gather(*(km.shutdown_kernel(now=True) for km in managers))

    with report.kernel_environment():
        runtime = Path(os.environ["JUPYTER_RUNTIME_DIR"])
        managers = [report.SocketFileKernelManager(kernel_name="python3") for _ in range(3)]
        assert {km.transport for km in managers} == {"ipc"}
        assert len({km.ip for km in managers}) == 3 and all(Path(km.ip).parent == runtime for km in managers)
        assert asyncio.run(start_execute_stop(managers)) == ["ok"] * 3
    assert not runtime.exists()


def test_the_method_section_says_how_each_devices_rows_were_measured_from_the_rows():
    frame = synthetic_dataset(nsweep=None)
    measured = frame.filter(pl.col("device") == frame["device"][0]).with_columns(
        pl.lit("cuda_events").alias("timer"), pl.when(pl.col("M") == 1).then(False).otherwise(pl.col("cold")).alias("cold"),
        pl.lit(5).alias("rounds"))
    line = headlines.method(measured)[0]
    cold = measured["cold"].mean()
    assert line.startswith(f"{measured['device'][0]} (") and f": {measured.height} rows from 1 run(s)" in line
    assert "two GPU events" in line and f"L2 flushed before every sample in {cold:.0%} of rows" in line
    assert "median of its 5 round medians" in line and f"{measured['stable'].mean():.1%} of rows settled" in line
    assert f"Read bandwidth {measured['device_gbps'].min():.0f}-{measured['device_gbps'].max():.0f} GB/s" in line
    assert "model numbers" in headlines.method(frame)[0]  # the synthetic timer says what it is
    assert headlines.method(frame)[-1].startswith("Every output was checked against a float64 reference")
