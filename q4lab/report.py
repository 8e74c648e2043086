"""`q4lab report`: run every notebook through papermill, export each to HTML without its code, and write
`reports/index.html` with the headline findings and links to the reports.

Reports render offline: figures come from `notebook_io.OfflineRenderer` (plotly.js embedded once per report),
and the HTML template drops the require.js, MathJax and mermaid scripts that nbconvert's "lab" template
loads from a CDN. A notebook that fails is still exported (papermill keeps its outputs up to the error,
which the report shows), the others still run, and the command exits non-zero at the end.

One run writes into an output folder at a time (`writer_lock`); a second is refused. Every file appears
whole: it is written beside its final name and renamed into place, so a reader (or a killed run) never
sees half a page.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import html
import os
import re
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import jinja2
import polars as pl
import yaml
from jupyter_client import AsyncKernelManager
from jupyter_core.paths import jupyter_runtime_dir

from q4lab import analysis, dataset, headlines, plots, provenance, tables, writer_lock
from q4lab.notebook_io import (RECORD_MIME, REPO, declared_parameters, describe, gpu_missing_reason, resolve,
                               type_mismatch)

NOTEBOOK_DIR = REPO / "notebooks"
NOTEBOOKS = ("crossover", "devices", "camping_outliers", "n_resonance", "shape_probe", "dispatch")
DEFAULT_DATA = "data/*.parquet"

# nbconvert's "lab" page, minus every script it would fetch from the network
OFFLINE_TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
"""
# What an exported page shows where a live widget was (without a kernel only its text fallback could show)
WIDGET_NOTE = ("<p><em>(an interactive widget: it works in JupyterLab with a running kernel; the exported "
               "report shows the snapshot below it)</em></p>")


class ReportError(ValueError):
    """An output folder that cannot be written."""


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` whole or not at all (`writer_lock.replacing`)."""
    with writer_lock.replacing(path) as partial:
        partial.write_text(text, encoding="utf-8")


@dataclass
class NotebookResult:
    name: str
    html: Path
    seconds: float
    error: str | None = None  # "cell N: ErrorName: message" when the run failed


class SocketFileKernelManager(AsyncKernelManager):
    """A kernel that talks over unix socket files of its own name in Jupyter's runtime folder. Over TCP the
    ports are picked before the kernel binds them, and with several kernels starting at once one of them
    can take another's port meanwhile ("ZMQError: Address already in use": that kernel never answers)."""

    def __init__(self, **kwargs):
        if os.name != "posix":  # no unix sockets
            super().__init__(**kwargs)
            return
        own_name = Path(jupyter_runtime_dir()) / f"kernel-{uuid.uuid4().hex[:12]}"
        super().__init__(transport="ipc", ip=str(own_name), **kwargs)


@contextlib.contextmanager
def kernel_environment():
    """Kernels get this interpreter (the venv's python3 kernelspec before any user-level one) and can
    import q4lab from this checkout even when it is not installed. Their connection and socket files go to
    a private folder, short enough for a unix socket's path, removed afterwards."""
    saved = {k: os.environ.get(k) for k in ("JUPYTER_PATH", "PYTHONPATH", "JUPYTER_RUNTIME_DIR")}
    prefixed = {"JUPYTER_PATH": str(Path(sys.prefix) / "share" / "jupyter"), "PYTHONPATH": str(REPO)}
    for key, first in prefixed.items():
        os.environ[key] = os.pathsep.join([first, *([saved[key]] if saved[key] else [])])
    runtime = tempfile.TemporaryDirectory(prefix="q4lab-kernels-", ignore_cleanup_errors=True)
    os.environ["JUPYTER_RUNTIME_DIR"] = runtime.name
    try:
        yield
    finally:
        runtime.cleanup()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _exporter():
    from nbconvert import HTMLExporter

    return HTMLExporter(extra_loaders=[jinja2.DictLoader({"q4lab_offline.html.j2": OFFLINE_TEMPLATE})],
                        template_file="q4lab_offline.html.j2", exclude_input=True,
                        exclude_input_prompt=True, exclude_output_prompt=True)


def _drop_records(notebook) -> None:
    """Values a notebook keeps for tests and readers (`notebook_io.record`) are not part of its page."""
    for cell in notebook.cells:
        if "outputs" in cell:
            cell.outputs = [o for o in cell.outputs if RECORD_MIME not in o.get("data", {})]


def _replace_widget_views(notebook) -> None:
    """Put WIDGET_NOTE where live-widget outputs were: without a kernel a page could only show their text
    fallback ("VBox(children=(IntSlider(..."); the static snapshot beside them stays."""
    import nbformat
    for cell in notebook.cells:
        for i, output in enumerate(cell.get("outputs", [])):
            if "application/vnd.jupyter.widget-view+json" in output.get("data", {}):
                cell.outputs[i] = nbformat.v4.new_output("display_data", data={"text/html": WIDGET_NOTE})


def run_notebook(name: str, out_dir: Path, parameters: dict, kernel_name: str = "python3",
                 timeout: int = 600, header: str = "") -> NotebookResult:
    """Execute notebooks/{name}.ipynb into out_dir/notebooks/ and export it to out_dir/{name}.html, with the
    HTML `header` (the data's kernel versions) atop the page (call it inside `kernel_environment()`)."""
    import nbformat
    import papermill
    from papermill.exceptions import PapermillExecutionError

    source = NOTEBOOK_DIR / f"{name}.ipynb"
    if not source.is_file():
        raise FileNotFoundError(f"no notebook {source}; notebooks: {sorted(p.stem for p in NOTEBOOK_DIR.glob('*.ipynb'))}")
    executed = out_dir / "notebooks" / f"{name}.ipynb"
    executed.parent.mkdir(parents=True, exist_ok=True)
    partial = executed.with_name(f".{name}.{os.getpid()}.partial.ipynb")  # papermill saves as it goes
    partial.unlink(missing_ok=True)
    start, error = time.perf_counter(), None
    try:
        papermill.execute_notebook(str(source), str(partial), parameters=parameters, kernel_name=kernel_name,
                                   cwd=str(REPO), progress_bar=False, execution_timeout=timeout,
                                   kernel_manager_class=SocketFileKernelManager)
    except PapermillExecutionError as err:
        first_line = next((line for line in err.source.splitlines() if line.strip()), "")
        error = f"cell {err.cell_index} (In [{err.exec_count}]: {first_line.strip()[:80]}): {err.ename}: {err.evalue}"
    except Exception as err:  # the kernel would not start, died or timed out: report it, keep going
        error = f"{type(err).__name__}: {err}"
    try:
        notebook = nbformat.read(partial, as_version=4)
        notebook.metadata.pop("widgets", None)  # widget state (megabytes of JS) that no offline page can use
        _replace_widget_views(notebook)
        _drop_records(notebook)
        body, _ = _exporter().from_notebook_node(notebook)
        os.replace(partial, executed)
    except Exception as err:  # never written, or unreadable: this notebook's page says so, the others go on
        error = error or f"{type(err).__name__}: {err}"
        partial.unlink(missing_ok=True)
        executed.unlink(missing_ok=True)  # an earlier run's notebook would not match this page
        body = f"<!DOCTYPE html><html><body><h1>{name}</h1><p>did not run: {html.escape(error)}</p></body></html>"
    body = re.sub(r"<body[^>]*>", lambda m: m[0] + header, body, count=1)
    html_path = out_dir / f"{name}.html"
    write_atomic(html_path, body)
    return NotebookResult(name, html_path, time.perf_counter() - start, error)


def write_index(out_dir: Path, results: list[NotebookResult], frame: pl.DataFrame, data_files: list[Path],
                header: str = "") -> Path:
    """reports/index.html: the data's kernel versions (`header`), headline findings, the data's provenance,
    and a link to every report."""
    try:
        crossovers = analysis.crossover_summary(frame)
        figure = plots.crossover_summary_chart(crossovers).to_html(
            full_html=False, include_plotlyjs=True, include_mathjax=False)
    except ValueError as err:
        crossovers, figure = None, f"<p>No crossover chart: {html.escape(str(err))}</p>"
    found = headlines.by_question(frame, crossovers)
    sections = "".join(f"<h2>{html.escape(title)}</h2><ul>{''.join(f'<li>{html.escape(s)}</li>' for s in lines)}</ul>"
                       for title, lines in found.items())
    links = "".join(
        f'<li><a href="{r.html.name}">{r.name}</a> — '
        + (f'<span class="failed">FAILED: {html.escape(r.error)}</span>' if r.error else f"ok ({r.seconds:.0f} s)")
        + "</li>" for r in results)
    synthetic = frame.filter(pl.col("timer") == "synthetic")["device"].unique().sort().to_list()
    banner = (f'<p class="failed">Synthetic data ({html.escape(", ".join(synthetic))}): model numbers with planted '
              f"effects from q4lab.synthetic, not measurements.</p>" if synthetic else "")
    method = "".join(f"<li>{html.escape(line)}</li>" for line in headlines.method(frame))
    origins = tables.static_html(describe(frame))
    files = "".join(f"<li><code>{html.escape(str(p.relative_to(REPO) if p.is_relative_to(REPO) else p))}</code></li>"
                    for p in data_files)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>q4lab reports</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.45}}
.failed{{color:#b71c1c;font-weight:bold}} code{{background:#f3f3f3}} table{{font-size:85%;border-collapse:collapse}}
td,th{{padding:2px 8px;border-bottom:1px solid #ddd;text-align:left}}</style></head>
<body><h1>q4lab reports</h1>{banner}{header}
<p>Fused 4-bit dequantize+GEMM kernels at inference batch sizes: crossovers, latency floors, N-resonance.</p>
<h2>Reports</h2><ul>{links}</ul>
{sections}
<h2>Median crossover per device and dtype</h2>{figure}
<h2>Method</h2><ul>{method}</ul>
<h2>Data</h2><ul>{files}</ul>{origins}
</body></html>"""
    index = out_dir / "index.html"
    write_atomic(index, page)
    return index


def build_reports(out_dir="reports", data=DEFAULT_DATA, notebooks=NOTEBOOKS, parameters: dict | None = None,
                  kernel_name: str = "python3", timeout: int = 600, jobs: int = 4, log=print,
                  progress_s: float = 15) -> list[NotebookResult]:
    """Run `notebooks` (names in notebooks/) on `data` with per-notebook `parameters`
    ({name: {param: value}}), `jobs` at a time, export each to out_dir/{name}.html, then write
    out_dir/index.html; `log` says when each starts and ends, and every `progress_s` seconds which are
    still running. Most of a run is kernel start-up, so jobs beyond the core count still help."""
    unknown = sorted(set(parameters or {}) - set(notebooks))
    if unknown:
        raise ValueError(f"parameters for notebooks {unknown} that are not being run; running {list(notebooks)}")
    data_files = resolve(data)  # fail once, clearly, before any notebook starts when there is no data
    frame = dataset.load(data_files)
    header = provenance.versions_html(provenance.version_lines(provenance.kernel_versions(data_files), REPO))
    out = Path(out_dir).resolve()  # papermill chdirs the whole process while a notebook runs: no relative paths
    with contextlib.ExitStack() as held:
        try:
            out.mkdir(parents=True, exist_ok=True)
            held.enter_context(writer_lock.hold(out / ".q4lab-report.lock", f"report folder {out}",
                                                "pass another --out"))
        except OSError as err:
            raise ReportError(f"--out {out}: cannot write reports there ({err.strerror or err}: {err.filename}); "
                              f"give a folder you can write to") from err
        for stale in out.rglob(".*.partial*"):  # left by a run that was killed; nobody else writes here now
            stale.unlink()
        log(f"running {len(notebooks)} notebook(s) on {len(data_files)} dataset(s), {jobs} at a time", flush=True)
        printing, running, finished = threading.Lock(), {}, threading.Event()

        def run(name: str) -> NotebookResult:
            # tables go beside the page, as CSV and parquet, where the notebook writes them
            takes = declared_parameters(NOTEBOOK_DIR / f"{name}.ipynb")
            exports = {"export_dir": str(out.resolve())} if "export_dir" in takes else {}
            params = {"data": [str(p) for p in data_files], **exports, **(parameters or {}).get(name, {})}
            with printing:
                running[name] = time.perf_counter()
                log(f"  {name}: running", flush=True)
            # a live notebook measures today's kernels: the data's versions are not what it shows
            result = run_notebook(name, out, params, kernel_name, timeout, "" if params.get("live") else header)
            with printing:
                running.pop(name)
                log(f"  {name}: " + (f"FAILED at {result.error}" if result.error else f"ok in {result.seconds:.1f} s")
                    + f" -> {result.html}", flush=True)
            return result

        def heartbeat():  # a notebook can take a minute: say which are still running, and for how long
            while not finished.wait(progress_s):
                with printing:
                    now = time.perf_counter()
                    if running:
                        log("  still running: " + ", ".join(f"{n} ({now - t:.0f} s)" for n, t in running.items()),
                            flush=True)

        threading.Thread(target=heartbeat, daemon=True).start()
        try:
            with kernel_environment(), ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
                results = list(pool.map(run, notebooks))
        finally:
            finished.set()
        index = write_index(out, results, frame, data_files, header)
    log(f"index: {index}", flush=True)
    return results


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of at least 1")
    return value


# ---------------------------------------------------------------------------------------------------------
# -p NOTEBOOK.NAME=VALUE: parameters checked against each notebook's parameters cell before anything runs
def _yaml(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=1000).removesuffix("\n...\n").strip()


def parse_parameters(specs: list[str], notebooks: tuple[str, ...]) -> dict[str, dict]:
    """{notebook: {name: value}} from `-p` specs "NOTEBOOK.NAME=VALUE" (that notebook) or "NAME=VALUE"
    (every notebook that takes NAME). VALUE is YAML (`[fp16, bf16]`, `8192`, `true`); a single value
    for a list parameter is a list of one. Names and types are checked as the notebooks check them."""
    declared = {name: declared_parameters(NOTEBOOK_DIR / f"{name}.ipynb") for name in notebooks}
    found: dict[str, dict] = {name: {} for name in notebooks}
    for spec in specs:
        target, sep, text = spec.partition("=")
        notebook, dot, param = target.rpartition(".")
        if not sep or not param:
            raise ValueError(f"-p {spec!r}: write NOTEBOOK.NAME=VALUE or NAME=VALUE, e.g. -p 'crossover.dtypes=[fp32]'")
        if dot and notebook not in declared:
            close = difflib.get_close_matches(notebook, declared, n=1)
            raise ValueError(f"-p {spec!r}: no notebook {notebook!r} in this run"
                             f"{f' (did you mean {close[0]!r}?)' if close else ''}; running {list(notebooks)}")
        takers = [notebook] if dot else [n for n in notebooks if param in declared[n]]
        if not takers or param not in declared[takers[0]]:
            names = sorted({p for n in ([notebook] if dot else notebooks) for p in declared[n]})
            close = difflib.get_close_matches(param, names, n=1)
            who = f"notebook {notebook!r} takes no" if dot else "no notebook takes a"
            raise ValueError(f"-p {spec!r}: {who} parameter {param!r}"
                             f"{f' (did you mean {close[0]!r}?)' if close else ''}; "
                             f"parameters: {names}")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ValueError(f"-p {spec!r}: VALUE is not YAML ({err.problem})") from None
        for name in takers:
            annotation, default = declared[name][param]
            fitted = [value] if isinstance(default, list) and not isinstance(value, list) else value
            if (expected := type_mismatch(fitted, annotation)) is not None:
                raise ValueError(f"-p {spec!r}: {name}.{param} must be {expected}, got {value!r}; "
                                 f"write it as YAML, e.g. -p '{name}.{param}={_yaml(default)}'")
            found[name][param] = fitted
    return {name: params for name, params in found.items() if params}


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", nargs="+", default=[DEFAULT_DATA],
                        help=f"dataset(s): parquet paths or globs (default {DEFAULT_DATA!r})")
    parser.add_argument("--out", default="reports", help="output folder (default reports/)")
    parser.add_argument("--only", nargs="+", choices=NOTEBOOKS, default=list(NOTEBOOKS), metavar="NOTEBOOK",
                        help=f"run only these notebooks ({', '.join(NOTEBOOKS)})")
    parser.add_argument("--timeout", type=_positive_int, default=600,
                        help="seconds a notebook cell may take (default 600)")
    parser.add_argument("--jobs", type=_positive_int, default=4,
                        help="notebooks run at a time (default 4; 1 when live)")
    parser.add_argument("-p", "--parameter", action="append", default=[], metavar="[NOTEBOOK.]NAME=VALUE",
                        dest="parameters", help="a notebook parameter, VALUE in YAML: -p crossover.dtypes=fp32 "
                        "(that notebook), -p 'dtypes=[fp16, bf16]' (every notebook that takes it); repeatable; "
                        "`papermill --help-notebook notebooks/NAME.ipynb` lists a notebook's parameters")
    parser.add_argument("--live", choices=("auto", "yes", "no"), default="auto",
                        help="notebooks measure on this machine's GPU instead of reading the data (auto: when "
                             "torch sees a GPU); the index's headlines still come from --data")


def live_parameters(live: str, notebooks: tuple[str, ...]) -> dict | None:
    """Per-notebook parameters for `--live`: {name: {"live": True}} when measuring, else None."""
    if live == "auto":
        live = "yes" if gpu_missing_reason() is None else "no"
    return {name: {"live": True} for name in notebooks} if live == "yes" else None


def report_command(args: argparse.Namespace) -> int:
    parameters = parse_parameters(args.parameters, tuple(args.only))
    live = live_parameters(args.live, tuple(args.only))
    for name, flag in (live or {}).items():
        parameters[name] = {**flag, **parameters.get(name, {})}
    # live notebooks share one GPU: running them side by side would time each other
    jobs = 1 if live else args.jobs
    results = build_reports(args.out, args.data, tuple(args.only), parameters, timeout=args.timeout, jobs=jobs)
    failed = [r for r in results if r.error]
    for r in failed:
        print(f"q4lab report: {r.name} failed at {r.error}", file=sys.stderr)
    return 1 if failed else 0
