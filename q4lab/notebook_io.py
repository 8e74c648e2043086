"""What every workbench notebook does around its analysis: check its papermill parameters, get its data
(read a dataset, or measure live on this machine's GPU), and show tables, figures and findings the way
the exported report needs them.

A notebook's parameters cell annotates every parameter with its type, one a line, and nothing else:

    data: Union[str, list] = "data/*.parquet"  # dataset(s): a parquet path, a glob, or a list of them
    live: bool = False  # measure on this machine's GPU instead of reading data

(papermill reads `name: type = default  # help` for `--help-notebook`; a help text must not contain "=").
The next cell, which runs after the one papermill injects, calls `nbio.check(globals())`: a name papermill
injected that the notebook does not declare, or a value of the wrong type, fails the run with a message
naming it (papermill itself only warns about unknown names and never checks types). `declared_parameters`
reads the same cell from the notebook file, so `q4lab report -p` can check a parameter before any run.
"""
from __future__ import annotations

import ast
import difflib
import glob
import html
import json
import re
import types
import typing
from pathlib import Path

import plotly.io as pio
import polars as pl
from plotly.io._base_renderers import MimetypeRenderer, PlotlyRenderer
from plotly.offline import get_plotlyjs

from q4lab import dataset

REPO = Path(__file__).resolve().parent.parent


class ParameterError(ValueError):
    """A notebook parameter that the notebook does not take, or of the wrong type."""


def _injected_names(namespace: dict) -> list[str]:
    """Names assigned by papermill's injected-parameters cells (their source starts with "# Parameters"),
    read back from IPython's input history; empty outside IPython or when nothing was injected."""
    names = []
    for source in namespace.get("In", ()):
        if source.lstrip().startswith("# Parameters"):
            names += [node.id for node in ast.walk(ast.parse(source))
                      if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)]
    return names


def _matches(value, annotation) -> bool:
    """isinstance for the annotations parameters use: classes, Union[...], list[...]; an int passes
    for a float, a bool never for an int, a tuple for a list."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if list in (origin, annotation) or tuple in (origin, annotation):
        element = args[0] if args else object
        return isinstance(value, (list, tuple)) and all(_matches(v, element) for v in value)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def type_mismatch(value, annotation) -> str | None:
    """None when `value` is of the parameter type `annotation`, else that type's name for the error message
    (an int passes for a float, a bool never for an int, a tuple for a list)."""
    if _matches(value, annotation):
        return None
    return annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")


# What a parameters cell's annotations may name
_ANNOTATION_NAMES = {"Union": typing.Union, "list": list, "str": str, "int": int, "float": float, "bool": bool}


def declared_parameters(notebook: Path) -> dict[str, tuple[object, object]]:
    """{parameter: (type annotation, default)} of a notebook file, read from its parameters cell: what
    `check` holds a run to once the notebook runs, known before it does."""
    import nbformat

    cell = next(c for c in nbformat.read(notebook, as_version=4).cells if "parameters" in c.metadata.get("tags", []))
    return {node.target.id: (eval(compile(ast.Expression(node.annotation), str(notebook), "eval"),
                                  dict(_ANNOTATION_NAMES)), ast.literal_eval(node.value))
            for node in ast.parse(cell.source).body if isinstance(node, ast.AnnAssign)}


def check(namespace: dict) -> dict:
    """Fail on an injected parameter the notebook does not declare (annotate in its parameters cell), or
    a declared parameter of the wrong type; return the parameters' values by name."""
    declared = dict(namespace.get("__annotations__", {}))
    if not declared:
        raise ParameterError("no annotated parameters in this namespace: run the parameters cell first")
    unknown = sorted(set(_injected_names(namespace)) - set(declared))
    if unknown:
        close = {u: m[0] for u in unknown if (m := difflib.get_close_matches(u, list(declared), n=1))}
        hint = "".join(f" (did you mean {m!r} for {u!r}?)" for u, m in close.items())
        raise ParameterError(f"unknown parameter(s) {unknown}{hint}: this notebook takes {sorted(declared)} "
                             f"(papermill --help-notebook NOTEBOOK explains each)")
    for name, annotation in declared.items():
        value = namespace.get(name)
        if (expected := type_mismatch(value, annotation)) is not None:
            raise ParameterError(f"parameter {name!r} = {value!r} is a {type(value).__name__}; "
                                 f"it must be {expected}{_accepted_form(name, annotation, value)}")
    return {name: namespace[name] for name in declared}


def _accepted_form(name: str, annotation, value) -> str:
    """How to pass a list on the command line (papermill's -p passes one string): YAML through -y."""
    if list in (typing.get_origin(annotation), annotation):
        items = f"[{value}]" if isinstance(value, (str, int, float)) else "[a, b]"
        return (f"; pass a list as YAML: papermill ... -y '{name}: {items}' (one value too, in brackets), "
                f"or q4lab report -p 'NOTEBOOK.{name}={items}'")
    return ""


# ---------------------------------------------------------------------------------------------------------
def resolve(data) -> list[Path]:
    """`dataset.resolve`, with relative paths and globs also looked up from the repository root (a
    notebook opened in JupyterLab runs in notebooks/), and a message saying what to do when nothing is
    there."""
    items = [data] if isinstance(data, (str, Path)) else list(data)
    found = []
    for item in items:
        path = Path(item)
        candidates = [path] if path.is_absolute() else [path, REPO / path]
        match = next((str(c) for c in candidates if glob.glob(str(c))), None)
        if match is None:
            where = " and ".join(dict.fromkeys(str(c.parent.resolve()) for c in candidates))
            raise dataset.DatasetError(
                f"no dataset matches {str(item)!r} (looked in {where}): measure one on a GPU with "
                f"`q4lab sweep` (it writes data/*.parquet), or point at one: data=PATH in a notebook "
                f"(papermill -p data PATH), --data PATH for `q4lab report`")
        found.append(match)
    return [p.resolve() for p in dataset.resolve(found)]


def load(data) -> pl.DataFrame:
    """Read and validate the datasets `data` names (see `resolve`) into one frame."""
    return dataset.load(resolve(data))


def gpu_missing_reason() -> str | None:
    """Why this machine cannot measure live (None when it can)."""
    import torch

    if not torch.cuda.is_available():
        build = "ROCm" if torch.version.hip else "CUDA" if torch.version.cuda else "CPU-only"
        return f"this machine has no usable GPU (torch {torch.__version__}, {build} build)"
    return None


def load_or_measure(data, live: bool, sweep: str = "grid", **sweep_args) -> pl.DataFrame:
    """With `live`, measure on this machine's GPU through `q4lab.sweep.run_grid` (sweep="grid") or
    `run_nsweep` (sweep="nsweep") with `sweep_args`; without a GPU say so and read `data` instead."""
    if sweep not in ("grid", "nsweep"):
        raise ValueError(f"sweep={sweep!r}: use 'grid' or 'nsweep'")
    if live:
        reason = gpu_missing_reason()
        if reason is None:
            from q4lab import sweep as sweeps

            print(f"live=True: measuring on this machine's GPU ({sweep}: {sweep_args})")
            return (sweeps.run_grid if sweep == "grid" else sweeps.run_nsweep)(**sweep_args)
        print(f"live=True, but {reason}: showing the dataset {data!r} instead")
    return load(data)


def select(frame: pl.DataFrame, **wanted) -> pl.DataFrame:
    """Rows whose columns hold the given values: a list or tuple means any of them, an empty one every
    value. A value the data lacks is an error naming what it holds (and the closest value), as is a
    combination with no rows."""
    conditions = []
    for column, value in wanted.items():
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        held = sorted(frame[column].unique().to_list())
        missing = [v for v in values if v not in held]
        if missing:
            close = [m for v in missing for m in difflib.get_close_matches(str(v), [str(h) for h in held], n=1)]
            raise ValueError(f"{column} {missing} not in the data{f' (did you mean {close}?)' if close else ''}; "
                             f"it holds {held}: pick from those")
        if values:
            conditions.append(pl.col(column).is_in(values))
    picked = frame.filter(*conditions) if conditions else frame
    if picked.is_empty():
        raise ValueError(f"no rows with {wanted}: the data holds each value, but not together")
    return picked


def figure_config(fig_dict: dict) -> dict:
    """plotly.js settings every figure gets: its camera button saves an SVG (vector, for a paper; drawn by the
    page's plotly.js, offline) named after the figure's title."""
    title = ((fig_dict.get("layout") or {}).get("title") or {}).get("text") or "figure"
    name = re.sub(r"[^a-z0-9]+", "-", re.sub(r"<[^>]+>", " ", title).lower()).strip("-")[:80] or "figure"
    return {"displaylogo": False, "toImageButtonOptions": {"format": "svg", "filename": f"q4lab-{name}"}}


class OfflineRenderer(MimetypeRenderer):
    """text/html that draws with `window.Plotly`, which `activate` embeds once (inline, no network), plus
    plotly's JSON mime type, which JupyterLab prefers when its plotly extension is there; both with
    `figure_config`."""

    def activate(self):
        from IPython.display import display_html
        display_html("<script>window.PlotlyConfig = {MathJaxConfig: 'local'};</script>"
                     f"<script>{get_plotlyjs()}</script>", raw=True)

    def to_mimebundle(self, fig_dict):
        config = figure_config(fig_dict)
        html = pio.to_html(fig_dict, config=config, include_plotlyjs=False, include_mathjax=False, full_html=False,
                           default_width="100%", validate=False)
        return {"text/html": html, **PlotlyRenderer(config=config).to_mimebundle(fig_dict)}


def use_offline_renderer():
    """Route `fig.show()` in this kernel through `OfflineRenderer` (plotly's own "notebook" renderer
    pulls MathJax from a CDN into every figure)."""
    pio.renderers["q4lab_offline"] = OfflineRenderer()
    pio.renderers.default = "q4lab_offline"



def use_report_display() -> None:
    """Figures through `OfflineRenderer` (they survive HTML export, offline) and tables that show whole
    device and shape names."""
    use_offline_renderer()
    pl.Config.set_fmt_str_lengths(80)
    pl.Config.set_tbl_rows(40)
    pl.Config.set_tbl_cols(-1)
    pl.Config.set_float_precision(4)
    pl.Config.set_tbl_hide_column_data_types(True)
    pl.Config.set_tbl_hide_dataframe_shape(True)


RECORD_MIME = "application/vnd.q4lab.record+json"  # a value a notebook keeps for tests and readers, not shown


def record(name: str, value) -> None:
    """Keep `value` (a frame, or anything JSON holds) in the executed notebook under `name`: the numbers
    behind what it shows, read back with `recorded` (papermill/scrapbook style). The report leaves it out."""
    from IPython.display import display

    if isinstance(value, pl.DataFrame):
        value = json.loads(value.write_json())  # rows as dicts; NaN and infinity become null
    display({RECORD_MIME: {"name": name, "value": value}}, raw=True)


def recorded(notebook) -> dict:
    """name -> value of every `record` in an executed notebook (an nbformat node)."""
    return {o["data"][RECORD_MIME]["name"]: o["data"][RECORD_MIME]["value"]
            for cell in notebook.cells if cell.cell_type == "code"
            for o in cell.get("outputs", []) if RECORD_MIME in o.get("data", {})}


def show_findings(lines: list[str]) -> None:
    """Headline sentences (`q4lab.headlines`) as a list that wraps in the notebook and the report."""
    from IPython.display import HTML, display

    display(HTML("<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in lines) + "</ul>"))


def describe(frame: pl.DataFrame) -> pl.DataFrame:
    """Where the rows come from: one line per device run with its provenance and size."""
    return (frame.group_by("device", "arch", "runtime", "torch_version", "kernel_hash", "git_commit", "run_id")
            .agg(pl.len().alias("rows"), pl.col("sweep").unique().sort().str.join(", ").alias("sweeps"),
                 pl.col("impl").unique().sort().str.join(", ").alias("impls"),
                 pl.col("timestamp").min().alias("first"), pl.col("timestamp").max().alias("last"))
            .sort("device", "run_id"))
