"""The headline findings as sentences, one list per question: analysis frames in, strings out. The report
index and the notebooks print the same ones."""
from __future__ import annotations

import polars as pl

from q4lab import analysis, dispatch, tables


def _config(row: dict) -> str:
    return f"{row['device']} · {row['dtype']} · {row['quant_type']}"


def crossovers(summary: pl.DataFrame) -> list[str]:
    lines = []
    for row in summary.iter_rows(named=True):
        rule = (f"a dispatcher would use {row['impl_a']} for M ≤ {row['threshold_m']}" if row["threshold_m"]
                else f"a dispatcher would never use {row['impl_a']}")
        lines.append(f"{_config(row)}: {row['impl_a']} beats {row['impl_b']} up to M* = {row['median_label']} "
                     f"(median over {row['n_shapes']} shapes, interquartile range {row['iqr_label']}); {rule} "
                     f"({row['threshold_slowdown']:.3f}× the time of always picking the faster one)")
    return lines


def camping(floors: pl.DataFrame) -> list[str]:
    lines = []
    for key, g in floors.group_by("device", "dtype", "quant_type", maintain_order=True):
        outliers, waves = g.filter(pl.col("label") == "camping"), g.filter(pl.col("label") == "wave_tail")
        found = ", ".join(f"{r['shape']} ({r['floor_us']:.3g} µs flat to M={r['m_floor']}, "
                          f"{r['excess_ratio']:.1f}× the model)" for r in outliers.iter_rows(named=True))
        line = f"{_config(dict(zip(('device', 'dtype', 'quant_type'), key)))}: {outliers.height} camping outlier(s) " \
               f"of {g.height} shapes{': ' + found if found else ''}"
        if waves.height:
            line += f"; {waves.height} wave tail(s), explained by the launch geometry: {', '.join(waves['shape'])}"
        slow = g.filter(pl.col("label") == "slow_not_flat")
        if slow.height:
            line += f"; {slow.height} slow but not flat (rising from M=1, not a floor): " + ", ".join(
                f"{r['shape']} ({r['t1_us'] / r['model_us']:.1f}× the model)" for r in slow.iter_rows(named=True))
        excess = tables.model_excess(g).row(0, named=True)
        line += (f"; over all shapes t(M=1) is {excess['median_over_model']:.2f}× the bandwidth model "
                 f"(interquartile range {excess['q25_over_model']:.2f}-{excess['q75_over_model']:.2f}×)")
        lines.append(line)
    return lines


def resonance(families: pl.DataFrame) -> list[str]:
    best = analysis.strongest_family(families)
    lines = []
    for key, g in families.group_by("device", "dtype", "quant_type", "K", "M", maintain_order=True):
        where = f"{key[0]} · {key[1]} · {key[2]} (K={key[3]}, M={key[4]})"
        top = best.filter(*(pl.col(c) == v for c, v in zip(("device", "dtype", "quant_type", "K", "M"), key)))
        if top.is_empty():
            lines.append(f"{where}: no resonance family (fewer than 2 flagged N share one)")
            continue
        r = top.row(0, named=True)
        lines.append(f"{where}: strongest family {r['family']}: {r['n_flagged']} of its {r['n_in_family']} N "
                     f"flagged, {r['flagged_share']:.0%} of all flagged N against a base rate of "
                     f"{r['base_share']:.1%} (enrichment {r['enrichment']:.1f}×)")
    return lines


def devices(comparison: pl.DataFrame, shift: pl.DataFrame) -> list[str]:
    """`tables.device_comparison` and `tables.crossover_shift` as one sentence per dtype: how much faster or
    slower B runs than A, and how far the crossovers move."""
    lines = []
    for (dtype,), g in comparison.group_by("dtype", maintain_order=True):
        ratio = g["ratio"]
        line = (f"{g['impl'][0]} ({dtype}) on {g['device_b'][0]} over {g['device_a'][0]}: median time ratio "
                f"{ratio.median():.2f}× (interquartile range {ratio.quantile(0.25):.2f}-{ratio.quantile(0.75):.2f}×) "
                f"over {g.height} shapes and batch sizes")
        for (baseline,), moves in shift.filter(pl.col("dtype") == dtype).group_by("baseline", maintain_order=True):
            known = moves["shift"].drop_nulls()
            line += (f"; M* against {baseline} moves by a median {known.median():.2f}× over the {known.len()} shapes "
                     f"where both are known" if known.len() else f"; M* against {baseline}: censored on one side")
        lines.append(line)
    return lines


def dispatch_regret(cross_validated: pl.DataFrame, folds: str = "family") -> list[str]:
    """`dispatch.cross_validate(..., by=("device", "kind"))` as one sentence per device."""
    lines = []
    for (device,), g in cross_validated.group_by("device", maintain_order=True):
        kinds = "; ".join(f"{r['kind']} {r['mean']:.3f}× mean, {r['p95']:.2f}× p95, {r['worst']:.2f}× worst"
                          for r in g.iter_rows(named=True))
        held_out = "shape families" if folds == "family" else "shapes"
        unscored = ", ".join(f"{r['kind']} {r['n_unscored']}" for r in g.iter_rows(named=True) if r["n_unscored"])
        lines.append(f"{device}: regret of each rule kind on held-out {held_out} (time of its pick / the fastest "
                     f"4-bit impl, over {g['n_points'].max()} points): {kinds}"
                     + (f" (points left unscored, their pick never measured on this device: {unscored})" if unscored else ""))
    return lines


def dispatch_disagreements(found: pl.DataFrame, tolerance: float = 1.10) -> list[str]:
    """`dispatch.disagreements(...)` as one sentence: at how many points no single choice (the arch's trees, which
    a card the data lacks takes) serves every device within `tolerance`, and the worst of them."""
    if found.is_empty():
        return ["No two devices of one arch disagree on the fastest impl at a point both measured."]
    beyond = found.filter(pl.col("beyond"))
    worst = found.row(0, named=True)
    return [f"{found.height} points where devices of one arch disagree on the fastest impl; at {beyond.height} of "
            f"them no single choice is within {tolerance:.2f}x of the best on every device. Worst: "
            f"{worst['shape']} {worst['dtype']} M={worst['M']} ({worst['best_by_device']}): {worst['floor_impl']} "
            f"gets {worst['floor']:.3f}x on one of them, the least the arch's trees can do there (each measured card "
            f"has its own)."]


def card_trees(gain: pl.DataFrame) -> list[str]:
    """`dispatch.card_trees(...)` as one sentence per device: its worst regret with its own trees and with its
    arch's alone."""
    return [f"{row['device']}: worst regret {row['own_worst']:.3f}x with its own dispatch trees, "
            f"{row['arch_worst']:.3f}x with its arch's alone (median {row['own_median']:.3f} / "
            f"{row['arch_median']:.3f}, {row['n_points']} points, in sample)" for row in gain.iter_rows(named=True)]


def m_inversions(found: pl.DataFrame, tolerance: float = 1.05) -> list[str]:
    """`analysis.m_inversions(...)` of several impls as one sentence per impl: how many points run slower
    than at a larger M, the commonest (M, faster M) pair and the largest ratio."""
    if found.is_empty():
        return ["No impl runs slower at any grid point than at a larger M of the same shape."]
    lines = []
    for (impl,), g in found.group_by("impl", maintain_order=True):
        common = g.group_by("M", "faster_m").len().sort("len", "M", descending=[True, False]).row(0, named=True)
        worst = g.row(0, named=True)
        lines.append(f"{impl}: {g.height} points slower than at a larger M (by more than {tolerance - 1:.0%}), most often M={common['M']} "
                     f"against M={common['faster_m']} ({common['len']} points); the largest {worst['ratio']:.2f}x, "
                     f"{worst['shape']} {worst['dtype']} at M={worst['M']} against M={worst['faster_m']}.")
    return lines


def dispatch_rollup(rolled: pl.DataFrame) -> list[str]:
    """`dispatch.rollup` as one sentence per (device, dtype, batch size): auto against dense and the best."""
    lines = []
    for key, g in rolled.group_by("device", "dtype", "quant_type", "model", "M", maintain_order=True):
        device, dtype, quant_type, model, M = key
        step = {r["impl"]: r for r in g.iter_rows(named=True)}
        auto, dense, best = step["auto"], step.get("dense"), step["best"]
        where = f"{quant_type.upper()} {model} at batch {M} on {device} ({dtype})"
        if not dense or dense["step_us"] is None:
            lines.append(f"{where}: not measured up to M={M}")
            continue
        if auto["step_us"] is None:
            lines.append(f"{where}: auto picks {auto['picks']}, not all measured on this device: no step time")
            continue
        how = "interpolated in log-log space between measured batch sizes" if auto["interpolated"] else "measured"
        lines.append(f"{where}: auto {auto['speedup_vs_dense']:.2f}× the speed of dense ({auto['step_us'] / 1e3:.3g} "
                     f"ms against {dense['step_us'] / 1e3:.3g} ms a decode step of {auto['weights']} weights through "
                     f"{auto['picks']}, {how}); the fastest 4-bit impl of each weight {best['speedup_vs_dense']:.2f}×")
    return lines


def dispatch_findings(frame: pl.DataFrame, batch=(1, 8)) -> list[str]:
    """The index's dispatch findings: held-out regret per rule kind, and the decode step at `batch` of the
    first model whose every weight was measured, under the default (table) rule fitted on all of `frame`."""
    grid = frame.filter(pl.col("sweep").is_in(analysis.GRID_SWEEPS))
    lines = dispatch_regret(dispatch.cross_validate(grid, by=("device", "kind")))
    models = dispatch.measured_models(grid)
    if not models:
        return lines + [f"no model roll-up: no model of {sorted(dispatch.MODELS)} has every weight measured"]
    return lines + dispatch_rollup(dispatch.rollup(grid, dispatch.fit(grid), models[0], batch))


TIMERS = {  # what a row's `timer` measured, as a methods section says it
    "cuda_events": ("device time between two GPU events around one call, the stream held by a spin kernel until "
                    "the host had queued the call (no host time counted)"),
    "wall_clock": "wall-clock time of one call on the CPU",
    "synthetic": "model numbers with planted effects (q4lab.synthetic), not measurements",
}


def method(frame: pl.DataFrame) -> list[str]:
    """How the rows of each device were measured, from the rows themselves: a methods section's sentences."""
    lines = []
    for (device,), g in frame.group_by("device", maintain_order=True):
        first, last = g["timestamp"].min()[:10], g["timestamp"].max()[:10]
        timers = "; ".join(TIMERS.get(t, t) for t in g["timer"].unique().sort())
        rounds = "-".join(dict.fromkeys(str(r) for r in (g["rounds"].min(), g["rounds"].max())))
        lines.append(
            f"{device} ({', '.join(g['arch'].unique().sort())}; {', '.join(g['runtime'].unique().sort())}; torch "
            f"{', '.join(g['torch_version'].unique().sort())}): {g.height} rows from {g['run_id'].n_unique()} run(s), "
            f"{first}{'' if first == last else ' to ' + last}, kernels {', '.join(g['kernel_hash'].unique().sort())}. "
            f"Times: {timers}; L2 flushed before every sample in {g['cold'].mean():.0%} of rows. A row's time is "
            f"the median of its {rounds} round medians, the rounds interleaved with the other points of its shape "
            f"({g['samples'].median():.0f} samples a row, median); {g['stable'].mean():.1%} of rows settled within "
            f"the sweep's spread tolerance, the others are marked unstable. "
            f"Read bandwidth {g['device_gbps'].min():.0f}-{g['device_gbps'].max():.0f} GB/s and launch latency "
            f"{g['launch_us'].min():.2f}-{g['launch_us'].max():.2f} µs, measured the same way in each run.")
    return lines + ["Every output was checked against a float64 reference before it was timed; outputs that "
                    "failed have no row."]


def by_question(frame: pl.DataFrame, summary: pl.DataFrame | None = None) -> dict[str, list[str]]:
    """Each question's headline sentences; a question the data cannot answer says why instead.
    `summary`: analysis.crossover_summary(frame) when the caller has it already."""
    questions = {
        "Crossovers (simt vs dequant_blas)": lambda: crossovers(
            analysis.crossover_summary(frame) if summary is None else summary),
        "Camping outliers": lambda: camping(analysis.camping_floors(frame)),
        "N-resonance": lambda: resonance(analysis.resonance(frame)[1]),
        "Dispatch rules (held-out regret) and a model's decode step": lambda: dispatch_findings(frame),
    }
    found = {}
    for title, answer in questions.items():
        try:
            found[title] = answer()
        except ValueError as err:
            found[title] = [f"not in this data: {err}"]
    unstable = analysis.needs_remeasurement(frame).height
    found["Needs re-measurement"] = [f"{unstable} unstable row(s), never flagged above" if unstable else "none"]
    return found
