"""The tables a report publishes, and how a notebook shows and writes them.

- `crossover_table`: per shape and dtype, the crossover M* of one impl against every baseline measured,
  with its censoring, stability and number of crossings; `crossover_pivot`: device x dtype, the median
  M* [interquartile range] and the dispatch threshold, per baseline.
- `device_pair`, `device_comparison`, `crossover_shift`: device B against device A, per shape and M,
  and how each shape's M* moves.
- `model_excess`: how far each device's M=1 times sit above its bandwidth model, over all shapes.
- `static_html`: a plain table for a page without scripts.
- `show`: an interactive table (itables: sortable, searchable, paged with a total; its JavaScript inline,
  so an exported page works offline) with constant columns said once above it; with an `export_dir` it
  also writes the whole frame there as CSV and parquet and links both.
"""
from __future__ import annotations

import html
from pathlib import Path

import polars as pl

from q4lab import analysis, writer_lock

SHAPE_KEY = ("shape", "family", "N", "K")
# never a baseline: `auto` dispatches between the others; `reference` is float64 on the CPU
NOT_BASELINES = ("auto", "reference")


def baselines(df: pl.DataFrame, impl_a: str) -> list[str]:
    """The impls measured in the M grids that `impl_a` can be raced against."""
    grid = df.filter(pl.col("sweep").is_in(analysis.GRID_SWEEPS))
    return [i for i in sorted(grid["impl"].unique().to_list()) if i != impl_a and i not in NOT_BASELINES]


def all_crossovers(df: pl.DataFrame, impl_a: str, against: list[str]) -> pl.DataFrame:
    """`analysis.crossovers` of `impl_a` against each impl in `against`, stacked (column `impl_b`)."""
    return pl.concat([analysis.crossovers(df, impl_a, b) for b in against])


def all_summaries(df: pl.DataFrame, impl_a: str, against: list[str]) -> pl.DataFrame:
    """`analysis.crossover_summary` of `impl_a` against each impl in `against`, stacked."""
    return pl.concat([analysis.crossover_summary(df, impl_a, b) for b in against])


def crossover_table(crossovers: pl.DataFrame) -> pl.DataFrame:
    """One row per (config, shape): shape, family, N, K and, for each baseline B in `crossovers` (from
    `all_crossovers`), `M* vs B` (the label: "> 128" when right-censored), `crossover_m vs B` (null when
    censored), `censored vs B`, `stable vs B` and `crossings vs B`."""
    keys = [*analysis.CONFIG, *SHAPE_KEY]
    table = None
    for (impl_b,), part in crossovers.group_by("impl_b", maintain_order=True):
        wide = part.select(*keys, pl.col("crossover_label").alias(f"M* vs {impl_b}"),
                           pl.col("crossover_m").alias(f"crossover_m vs {impl_b}"),
                           pl.col("censored").alias(f"censored vs {impl_b}"),
                           pl.col("stable").alias(f"stable vs {impl_b}"),
                           pl.col("n_crossings").alias(f"crossings vs {impl_b}"))
        table = wide if table is None else table.join(wide, on=keys, how="full", coalesce=True)
    return table.sort("device", "dtype", "N", "K", "shape")


def crossover_pivot(summaries: pl.DataFrame) -> pl.DataFrame:
    """Device (and baseline) x dtype: "median M* [interquartile range]; dispatch M <= T" from
    `all_summaries`, the dispatch threshold being `analysis.crossover_summary`'s."""
    cells = summaries.with_columns(cell=pl.format(
        "{} [{}]; dispatch M ≤ {}", "median_label", "iqr_label", pl.col("threshold_m").cast(pl.Utf8)))
    rows = [c for c in (*analysis.CONFIG, "impl_a", "impl_b") if c != "dtype"]
    return (cells.pivot("dtype", index=rows, values="cell", sort_columns=True)
            .rename({"impl_a": "impl", "impl_b": "baseline"}).sort("device", "baseline"))


# ---------------------------------------------------------------------------------------------------------
def device_pair(df: pl.DataFrame, device_a: str = "", device_b: str = "") -> tuple[str, str] | None:
    """(A, B): the devices named, or the data's first two (sorted) when not named; None when the data
    holds one device. A named device the data lacks is an error naming those it holds."""
    held = sorted(df["device"].unique().to_list())
    for name in (device_a, device_b):
        if name and name not in held:
            raise ValueError(f"no device {name!r} in the data; it holds {held}")
    a = device_a or next((d for d in held if d != device_b), None)
    b = device_b or next((d for d in held if d != a), None)
    return (a, b) if a and b and a != b else None


def device_comparison(df: pl.DataFrame, impl: str, device_a: str, device_b: str) -> pl.DataFrame:
    """Per (dtype, quant config, shape, M) measured on both devices: `impl`'s median time on each and
    `ratio` = time on B / time on A (below 1: B is faster)."""
    config = [c for c in analysis.CONFIG if c != "device"]
    keys = [*config, *SHAPE_KEY, "M"]
    rows = df.filter(pl.col("sweep").is_in(analysis.GRID_SWEEPS), pl.col("impl") == impl)
    per_device = {d: rows.filter(pl.col("device") == d).group_by(keys).agg(pl.col("time_us").median())
                  for d in (device_a, device_b)}
    both = per_device[device_a].join(per_device[device_b], on=keys, suffix="_b")
    return (both.select(pl.lit(device_a).alias("device_a"), pl.lit(device_b).alias("device_b"),
                        pl.lit(impl).alias("impl"), *keys, pl.col("time_us").alias("time_a_us"),
                        pl.col("time_us_b").alias("time_b_us"),
                        (pl.col("time_us_b") / pl.col("time_us")).alias("ratio"))
            .sort("dtype", "N", "K", "shape", "M"))


def crossover_shift(crossovers: pl.DataFrame, device_a: str, device_b: str) -> pl.DataFrame:
    """Per (dtype, quant config, baseline, shape): M* on A and on B (labels) and `shift` = M*_B / M*_A
    (null when either is censored)."""
    keys = [c for c in analysis.CONFIG if c != "device"] + ["impl_a", "impl_b", *SHAPE_KEY]
    a, b = (crossovers.filter(pl.col("device") == d).select(*keys, "crossover_m", "crossover_label")
            for d in (device_a, device_b))
    return (a.join(b, on=keys, suffix="_b")
            .select(*keys, pl.col("crossover_label").alias("M* on A"), pl.col("crossover_label_b").alias("M* on B"),
                    (pl.col("crossover_m_b") / pl.col("crossover_m")).alias("shift"))
            .rename({"impl_a": "impl", "impl_b": "baseline"}).sort("dtype", "baseline", "N", "K", "shape"))


def model_excess(floors: pl.DataFrame) -> pl.DataFrame:
    """Per config of `analysis.camping_floors`: over its shapes, the median, quartiles and largest time at
    M=1 over the bandwidth model (1.0: on the model)."""
    ratio = pl.col("t1_us") / pl.col("model_us")
    return (floors.group_by(*analysis.CONFIG, maintain_order=True)
            .agg(pl.len().alias("shapes"), ratio.median().alias("median_over_model"),
                 ratio.quantile(0.25).alias("q25_over_model"), ratio.quantile(0.75).alias("q75_over_model"),
                 ratio.max().alias("max_over_model"))
            .sort(*analysis.CONFIG))


# ---------------------------------------------------------------------------------------------------------
_itables_ready = False


def export(frame: pl.DataFrame, export_dir, name: str) -> list[Path]:
    """Write `frame` to export_dir/name.csv and .parquet; return both paths."""
    folder = Path(export_dir)
    folder.mkdir(parents=True, exist_ok=True)
    csv, parquet = folder / f"{name}.csv", folder / f"{name}.parquet"
    with writer_lock.replacing(csv) as partial:  # a reader never sees half a table
        frame.write_csv(partial)
    with writer_lock.replacing(parquet) as partial:
        frame.write_parquet(partial)
    return [csv, parquet]


def display_frame(frame: pl.DataFrame) -> tuple[pl.DataFrame, dict]:
    """What `show` draws: floats to 4 significant digits, and the columns that hold one value in every
    row (when there are several rows) taken out, returned as {column: value}."""
    constant = {c: frame[c][0] for c in frame.columns if frame.height > 1 and frame[c].n_unique() == 1}
    shown = frame.drop(list(constant)).with_columns(
        pl.col(c).round_sig_figs(4) for c, dtype in frame.schema.items() if dtype.is_float() and c not in constant)
    return shown, constant


def static_html(frame: pl.DataFrame) -> str:
    """`frame` as a plain HTML table, for a page without a kernel or scripts (the report index): values as
    text, never quoted."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in frame.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in frame.iter_rows())
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def show(frame: pl.DataFrame, title: str, name: str = "", export_dir: str = "", columns=None,
         page_rows: int = 10) -> None:
    """Display `frame` (only `columns`, if given) as an interactive table of `page_rows` rows a page under
    `title`, with its constant columns said once above it; an empty frame shows as "none", and
    `page_rows=0` shows the title, the row count and the links only. With `name` and `export_dir`, write
    the whole frame there as CSV and parquet first and link both (relative: the page sits beside them)."""
    import itables
    from IPython.display import HTML, display

    global _itables_ready
    if not _itables_ready:  # the DataTables bundle, inline once per kernel: pages work offline
        itables.init_notebook_mode(all_interactive=False, connected=False)
        _itables_ready = True
    links = ""
    if name and export_dir:
        files = export(frame, export_dir, name)
        links = " · ".join(f'<a href="{html.escape(p.name)}">{html.escape(p.suffix[1:])}</a>' for p in files)
        links = f" <small>(download: {links})</small>"
    shown, constant = display_frame(frame.select(columns) if columns else frame)
    header = f"<p><b>{html.escape(title)}</b>{links}"
    if frame.is_empty() or not page_rows:
        display(HTML(header + (": none" if frame.is_empty() else f": {frame.height} rows") + "</p>"))
        return
    if constant:
        header += "<br><small>" + "; ".join(f"{html.escape(c)}: {html.escape(str(v))}" for c, v in constant.items()) + "</small>"
    display(HTML(header + "</p>" + itables.to_html_datatable(
        shown, showIndex=False, show_dtypes=False, maxBytes=0, scrollX=True, classes="display nowrap compact",
        pageLength=page_rows, lengthMenu=sorted({page_rows, 10, 25, 100}), display_logo_when_loading=False)))
