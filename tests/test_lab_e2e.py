"""End to end in a real browser: JupyterLab from .venv, the shape prober's sliders moving its plot,
and a report rendering its plots offline. Debian's chromium runs headless under Playwright; every request
the pages make must stay on the machine."""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import time
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from e2e_helpers import CHROMIUM, CHROMIUM_ARGS, ROOT, RequestLog, jupyter_lab, screenshots_on_failure

NOTEBOOKS = ROOT / "notebooks"
PROBE = "shape_probe.ipynb"
# the text of a plotly figure as drawn: its lines' path data and every label (title, legend, ticks)
PLOT_DRAWING_JS = """plot => Array.from(plot.querySelectorAll('.main-svg path, .main-svg text'))
    .map(node => node.getAttribute('d') || node.textContent).join('|')"""


@pytest.fixture(scope="module")
def chromium():
    if not CHROMIUM.exists():
        pytest.skip(
            f"!!! {CHROMIUM} is missing and could not be installed (make test runs `apt-get install chromium`; "
            "see its warning above): the browser tests did NOT run !!!"
        )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(chromium):
    context = chromium.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(30_000)
    yield context.new_page()
    context.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    assert (NOTEBOOKS / PROBE).exists(), f"{NOTEBOOKS / PROBE} is missing"
    # Q4LAB_E2E_PORT picks the port; by default a free one.
    port = int(os.environ.get("Q4LAB_E2E_PORT", "0")) or None
    with jupyter_lab(NOTEBOOKS, tmp_path_factory.mktemp("jupyter"), port=port) as server:
        yield server


def run_all_cells(page, notebook_path: str, timeout_s: float = 120) -> None:
    """Run → Run All Cells, then wait until every code cell has run; fail naming the cell that raised."""
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
    prompts = page.locator(".jp-Notebook .jp-CodeCell .jp-InputPrompt")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        texts = [text.strip() for text in prompts.all_text_contents()]
        if texts and all(re.fullmatch(r"\[\d+\]:", text) for text in texts):
            return
        started = any(re.fullmatch(r"\[\d+\]:", text) for text in texts)
        if started and "[*]:" not in texts:  # the run stopped before the end: a cell raised
            errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
            raise AssertionError(f"{notebook_path} stopped at a failing cell:\n" + "\n".join(errors.all_inner_texts()))
        time.sleep(0.5)
    raise AssertionError(f"{notebook_path} did not finish running within {timeout_s} s; prompts: {texts}")


def slider(page, label: str):
    """The ipywidgets slider whose description is `label`."""
    sliders = page.locator(".widget-slider").filter(
        has=page.locator(".widget-label", has_text=re.compile(rf"^\s*{re.escape(label)}\b"))
    )
    sliders.first.wait_for()  # widgets render after their cell has run
    assert sliders.count() == 1, f"expected one slider labelled {label!r}, found {sliders.count()}"
    return sliders


def folder_digest(folder) -> dict[str, str]:
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def wait_for_drawing(plot, done, what: str, timeout_s: float = 30) -> str:
    """Poll the plot's drawing until `done(drawing)`; fail saying `what` did not happen."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        drawing = plot.evaluate(PLOT_DRAWING_JS)
        if done(drawing):
            return drawing
        time.sleep(0.25)
    raise AssertionError(f"{what} within {timeout_s} s; the plot's text now: {drawing[-600:]}")


def test_busy_port_is_named(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"port {port} on 127.0.0.1 is already in use"):
            with jupyter_lab(NOTEBOOKS, tmp_path, port=port):
                pass


@pytest.mark.slow
def test_kernel_that_fails_to_start_is_reported_with_its_log(tmp_path):
    # A `python3` kernel spec that dies at once, found first through JUPYTER_PATH.
    spec = tmp_path / "share" / "kernels" / "python3" / "kernel.json"
    spec.parent.mkdir(parents=True)
    spec.write_text(json.dumps({"argv": ["sh", "-c", "echo kernel-broken-on-purpose >&2; exit 3"],
                                "display_name": "broken", "language": "python"}))
    with jupyter_lab(tmp_path, tmp_path / "jupyter", env={"JUPYTER_PATH": str(tmp_path / "share")}) as server:
        request = {"path": "x.ipynb", "type": "notebook", "name": "", "kernel": {"name": "python3"}}
        server.api("/api/sessions", body=request)
        with pytest.raises(RuntimeError, match=r"(?s)the kernel of x.ipynb did not start within 5 s.*kernel-broken-on-purpose"):
            server.wait_for_idle_kernel("x.ipynb", timeout_s=5)


@pytest.mark.browser
def test_shape_probe_slider_redraws_the_plot(page, lab, tmp_path):
    notebooks_before = folder_digest(NOTEBOOKS)
    requests = RequestLog(page)
    with screenshots_on_failure(page, tmp_path, "shape_probe") as steps:
        page.goto(f"{lab.url}/lab/tree/{PROBE}?reset&token={lab.token}")  # reset: no other test's tabs
        page.wait_for_selector(".jp-Notebook")
        lab.wait_for_idle_kernel(PROBE)
        steps.shot("opened")

        run_all_cells(page, PROBE)
        n_slider = slider(page, "N")
        # the prober's own plot: the one drawn beside its sliders (a static snapshot may follow it)
        plot = page.locator(".jp-OutputArea-output").filter(has=n_slider).locator(".js-plotly-plot").first
        plot.scroll_into_view_if_needed()  # JupyterLab skips drawing cells out of view
        plot.locator(".main-svg").first.wait_for()
        steps.shot("ran-all-cells")

        readout = n_slider.locator(".widget-readout")
        n_before = readout.inner_text()
        drawing_before = plot.evaluate(PLOT_DRAWING_JS)
        n_slider.locator(".noUi-handle").focus()
        n_slider.locator(".noUi-handle").press("End")  # to the largest N
        expect(readout).not_to_have_text(n_before)
        n_after = readout.inner_text()
        # redrawn, and for the new shape: the prober names the N asked for in the figure's title
        wait_for_drawing(plot, lambda drawing: drawing != drawing_before and n_after in drawing,
                         f"the plot did not redraw naming N={n_after} after the N slider moved from {n_before}")
        steps.shot("moved-N")

        assert requests.urls, "no request was recorded: the recorder is broken"
        assert requests.off_machine() == [], "requests left the machine"
    assert folder_digest(NOTEBOOKS) == notebooks_before, f"the test wrote into {NOTEBOOKS} (outputs, checkpoints)"


# How far apart the colours of the first heatmap on the page lie: the largest range of one of R, G, B over its
# pixels (plotly paints a heatmap as one image). A scale far wider than the data paints every cell in nearly
# one colour: a range of a few tens.
HEATMAP_COLOUR_RANGE_JS = """async () => {
    const plot = Array.from(document.querySelectorAll('.js-plotly-plot'))
        .find(p => (p.data || []).some(t => t.type === 'heatmap'));
    const image = plot.querySelector('.heatmaplayer image');
    const picture = new Image();
    picture.src = image.getAttribute('href') || image.getAttribute('xlink:href');
    await picture.decode();
    const canvas = Object.assign(document.createElement('canvas'), {width: picture.width, height: picture.height});
    const context = canvas.getContext('2d');
    context.drawImage(picture, 0, 0);
    const pixels = context.getImageData(0, 0, picture.width, picture.height).data;
    const low = [255, 255, 255], high = [0, 0, 0];
    for (let i = 0; i < pixels.length; i += 4) {
        if (pixels[i + 3] === 0) continue;  // an empty cell
        for (let c = 0; c < 3; c++) { low[c] = Math.min(low[c], pixels[i + c]); high[c] = Math.max(high[c], pixels[i + c]); }
    }
    return Math.max(...high.map((h, c) => h - low[c]));
}"""
# Every interactive table (itables) drawn: DataTables marks each it initialised with the class dataTable.
TABLES_DRAWN_JS = """() => Array.from(document.querySelectorAll('table[id^="itables_"]')).every(t => t.classList.contains('dataTable'))"""
CELL_TEXTS_JS = """() => Array.from(document.querySelectorAll('td')).map(td => td.textContent.trim())"""
MAX_PAGE_PX = 6000


@pytest.mark.browser
@pytest.mark.slow
def test_every_report_page_is_readable_on_the_shipped_data(page, tmp_path):
    """Every page of `q4lab report` on data/: no taller than ~6,000 px, tables without quoted strings, a
    crossover heatmap in more than one colour, the per-shape table on disk with a row per shape and dtype,
    plots drawn, and no request off the machine."""
    import polars as pl

    from q4lab import dataset
    from q4lab.notebook_io import resolve
    from q4lab.report import DEFAULT_DATA, NOTEBOOKS, build_reports

    out_dir = tmp_path / "reports"
    results = build_reports(out_dir=out_dir)
    assert {result.name: result.error for result in results} == {name: None for name in NOTEBOOKS}
    requests = RequestLog(page)
    with screenshots_on_failure(page, tmp_path, "report") as steps:
        page.goto((out_dir / "index.html").as_uri())
        page.locator(".js-plotly-plot .main-svg").first.wait_for()  # the index's own chart
        pages = page.locator("a[href$='.html']").evaluate_all("links => links.map(a => a.getAttribute('href'))")
        assert sorted(pages) == sorted(f"{name}.html" for name in NOTEBOOKS)
        for name in ["index.html", *pages]:
            page.goto((out_dir / name).as_uri())
            page.wait_for_function(TABLES_DRAWN_JS)
            steps.shot(name)
            height = page.evaluate("document.documentElement.scrollHeight")
            assert height < MAX_PAGE_PX, f"{name} is {height} px tall"
            quoted = [text for text in page.evaluate(CELL_TEXTS_JS) if len(text) > 1 and text[0] == text[-1] == '"']
            assert quoted == [], f"{name} shows quoted strings: {quoted[:5]}"
            plots = page.locator(".js-plotly-plot")
            for i in range(plots.count()):
                assert plots.nth(i).locator(".main-svg path").count() > 0, f"plot {i} of {name} drew nothing"
            if name == "crossover.html":
                assert page.evaluate(HEATMAP_COLOUR_RANGE_JS) > 150, "the crossover heatmap is (nearly) one colour"
                assert page.locator("a[href='crossover_per_shape.csv']").count() == 1
                plots.first.hover()  # its camera button saves the figure as vector SVG, drawn offline
                with page.expect_download() as saved:
                    plots.first.locator(".modebar-btn[data-title^='Download']").first.click()
                assert saved.value.suggested_filename.endswith(".svg")
                assert Path(saved.value.path()).read_text().startswith("<svg")
        assert requests.off_machine() == [], "requests left the machine"
    grid = dataset.load(resolve(DEFAULT_DATA)).filter(pl.col("sweep") == "grid")
    per_shape = pl.read_csv(out_dir / "crossover_per_shape.csv")
    assert per_shape.height == grid.select("device", "shape", "dtype").n_unique()
    assert set(per_shape.select("shape", "dtype").iter_rows()) == set(grid.select("shape", "dtype").iter_rows())


# The client coordinates of the middle row of a heatmap's first column, centred in view, and that row's shape.
HEATMAP_CELL_JS = """plot => {
    const trace = plot.data[0], xa = plot._fullLayout.xaxis, ya = plot._fullLayout.yaxis;
    const shape = trace.y[Math.floor(trace.y.length / 2)];
    plot.querySelector('.main-svg').scrollIntoView({block: 'start'});
    const box = plot.getBoundingClientRect();
    return {shape, x: box.left + xa._offset + xa.d2p(trace.x[0]), y: box.top + ya._offset + ya.d2p(shape)};
}"""


@pytest.mark.browser
@pytest.mark.slow
def test_clicking_a_crossover_heatmap_cell_opens_that_shape_in_the_prober(page, lab, tmp_path):
    notebook = "crossover.ipynb"
    with screenshots_on_failure(page, tmp_path, "crossover_link") as steps:
        page.goto(f"{lab.url}/lab/tree/{notebook}?reset&token={lab.token}")
        page.wait_for_selector(".jp-Notebook")
        lab.wait_for_idle_kernel(notebook)
        run_all_cells(page, notebook, timeout_s=300)
        # the cell that shows the linked heatmap above the prober: its output area holds the prober's N slider
        outputs = page.locator(".jp-Cell-outputArea").filter(has=slider(page, "N"))
        heatmap, probe_plot = outputs.locator(".js-plotly-plot").nth(0), outputs.locator(".js-plotly-plot").nth(1)
        heatmap.scroll_into_view_if_needed()
        heatmap.locator(".main-svg").first.wait_for()
        status = outputs.locator(".widget-html").filter(has_text=re.compile(r"\(N=\d+, K=\d+\)")).first
        before = status.inner_text()
        steps.shot("linked-heatmap")

        cell = heatmap.evaluate(HEATMAP_CELL_JS)
        assert cell["shape"] not in before, f"the prober already shows {cell['shape']}: pick another row"
        page.mouse.click(cell["x"], cell["y"])
        expect(status).to_contain_text(f"{cell['shape']} (N=")
        probe_plot.scroll_into_view_if_needed()
        wait_for_drawing(probe_plot, lambda drawing: cell["shape"] in drawing,
                         f"the prober's plot did not switch to {cell['shape']} after its heatmap cell was clicked")
        steps.shot("clicked")
