"""The workbench's three questions as functions of a dataset (docs/DESIGN.md, "Definitions"): polars frames in,
polars frames out, nothing measured here.

- `crossovers` / `crossover_summary`: up to which batch size M one impl beats another, per shape and as a
  censoring-aware median over shapes, plus the one threshold a dispatcher would use.
- `camping_floors`: shapes stuck on a latency floor far above the bandwidth model, told apart from
  wave-quantization tails, which the launch geometry predicts (`q4lab.launch.wave_slowdown`).
- `resonance`: N values whose achieved bandwidth falls below the smooth trend in an N-sweep, grouped into
  aliasing families (multiples of 1024, 3072, ...).
- `needs_remeasurement`: rows the sweep marked unstable; they are never flagged as floors or resonances.

Every analysis keeps measurement configurations apart (`CONFIG`: device, dtype, quant type, blocksize,
nested, cold cache); repeated measurements of one point are combined by their median and count as stable
only when all of them were.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import polars as pl

from q4lab.dataset import SCHEMA, check_values
from q4lab.launch import wave_slowdown

# What makes two measurements comparable; analyses never mix across these.
CONFIG = ("device", "dtype", "quant_type", "blocksize", "nested", "cold")
GRID_SWEEPS = ("grid", "repeat")  # the `sweep` values whose rows form M grids (an N sweep's do not)
POINT = (*CONFIG, "shape", "family", "N", "K", "M")

# ---------------------------------------------------------------------------------------------------------
def _points(df: pl.DataFrame, impl: str, sweeps: tuple[str, ...]) -> pl.DataFrame:
    """One row per measured point of `impl` in the given sweeps; repeats combined (median time, stable
    only if every repeat was). Rows with bad numbers raise `DatasetError` (a ValueError): no analysis
    answers from them."""
    rows = df.filter(pl.col("impl") == impl, pl.col("sweep").is_in(sweeps))
    if rows.is_empty():
        present = sorted(df.filter(pl.col("sweep").is_in(sweeps))["impl"].unique().to_list())
        raise ValueError(f"no {'/'.join(sweeps)} rows for impl {impl!r}; impls measured there: {present} "
                         f"(pick one of those, or measure {impl!r} with `q4lab sweep`)")
    check_values(rows, f"the {impl!r} {'/'.join(sweeps)} rows")
    return (rows.group_by(POINT, maintain_order=True)
            .agg(pl.col("time_us").median(), pl.col("stable").all(), pl.col("spread").max(),
                 pl.col("bytes").first(), pl.col("arch").first(),
                 pl.col("launch_us").median(), pl.col("device_gbps").median())
            .sort([*CONFIG, "shape", "M"]))


def _groups(frame: pl.DataFrame, keys):
    for key, group in frame.group_by(list(keys), maintain_order=True):
        yield dict(zip(keys, key)), group


def _m_label(m: float) -> str:
    return f"{m:.3g}" if m < 100 else f"{m:.0f}"


# ---------------------------------------------------------------------------------------------------------
# Crossovers
CROSSOVER_SCHEMA = {**{c: SCHEMA[c] for c in CONFIG}, "impl_a": pl.Utf8, "impl_b": pl.Utf8,
                    **{c: SCHEMA[c] for c in ("shape", "family", "N", "K")},
                    "crossover_m": pl.Float64, "censored": pl.Utf8, "crossover_label": pl.Utf8,
                    "m_min_measured": pl.Int64, "m_max_measured": pl.Int64, "n_crossings": pl.Int64,
                    "stable": pl.Boolean}


def _crossing(m: np.ndarray, log_ratio: np.ndarray) -> dict:
    """Where A (log_ratio = log t_A - log t_B < 0: A wins) stops winning for good, interpolated linearly
    in log M between the last M where A wins and the next measured M."""
    wins = log_ratio < 0
    n_crossings = int(np.count_nonzero(wins[1:] != wins[:-1]))
    if not wins.any():
        return {"crossover_m": None, "censored": "left", "crossover_label": f"< {_m_label(m[0])}",
                "n_crossings": n_crossings}
    last = int(np.flatnonzero(wins)[-1])
    if last == len(m) - 1:
        return {"crossover_m": None, "censored": "right", "crossover_label": f"> {_m_label(m[-1])}",
                "n_crossings": n_crossings}
    x0, x1 = math.log(m[last]), math.log(m[last + 1])
    d0, d1 = log_ratio[last], log_ratio[last + 1]
    crossover = math.exp(x0 + (x1 - x0) * (-d0) / (d1 - d0))
    return {"crossover_m": crossover, "censored": "none", "crossover_label": _m_label(crossover),
            "n_crossings": n_crossings}


def crossovers(df: pl.DataFrame, impl_a: str = "simt", impl_b: str = "dequant_blas") -> pl.DataFrame:
    """Per (config, shape): the batch size M* where `impl_a` stops beating `impl_b`.

    `crossover_m` is interpolated in log-log space between the two measured M that bracket it; it is null
    when censored: `"right"` when A still wins at the largest measured M (M* > m_max_measured), `"left"`
    when A wins at no measured M (M* < m_min_measured). `n_crossings` > 1 means the winner changed more
    than once (the reported M* is the last change). Only M measured for both impls count.
    """
    a, b = _points(df, impl_a, GRID_SWEEPS), _points(df, impl_b, GRID_SWEEPS)
    both = a.join(b.select(*POINT, "time_us", "stable"), on=list(POINT), suffix="_b")
    if both.is_empty():
        raise ValueError(f"{impl_a!r} and {impl_b!r} were never measured at the same shape and M; "
                         f"measure both in one sweep (q4lab sweep --impls {impl_a},{impl_b})")
    rows = []
    for key, g in _groups(both.sort("M"), (*CONFIG, "shape", "family", "N", "K")):
        m = g["M"].to_numpy().astype(float)
        log_ratio = np.log(g["time_us"].to_numpy() / g["time_us_b"].to_numpy())
        rows.append({**key, "impl_a": impl_a, "impl_b": impl_b, **_crossing(m, log_ratio), "m_min_measured": int(m[0]),
                     "m_max_measured": int(m[-1]),
                     "stable": bool(g["stable"].all() and g["stable_b"].all())})
    return pl.DataFrame(rows, schema=CROSSOVER_SCHEMA)


def _quantile(values: np.ndarray, q: float) -> float:
    """Linear-interpolation quantile (numpy's default) that keeps infinity instead of inf - inf = nan."""
    ordered = np.sort(values)
    position = q * (len(ordered) - 1)
    below, fraction = int(position), position - int(position)
    if fraction == 0 or math.isinf(ordered[below]):
        return float(ordered[below])
    if math.isinf(ordered[below + 1]):
        return math.inf
    return float(ordered[below] + fraction * (ordered[below + 1] - ordered[below]))


def _censored_quantile(lo: np.ndarray, hi: np.ndarray, q: float) -> tuple[float, float]:
    """Bounds of a quantile over values only known to lie in [lo, hi] (hi = inf when right-censored).
    Quantiles are monotone in every value, so the true one lies between the quantiles of the bounds."""
    return _quantile(lo, q), _quantile(hi, q)


def _bounds_label(lo: float, hi: float) -> str:
    if hi == lo:
        return _m_label(lo)
    if math.isinf(hi):
        return f"> {_m_label(lo)}"
    if lo == 0:
        return f"< {_m_label(hi)}"
    return f"{_m_label(lo)}-{_m_label(hi)}"


def _dispatch_threshold(pairs: pl.DataFrame) -> tuple[int, float]:
    """The M threshold T of the rule "impl A when M <= T, else B" (T = 0: never A) that minimizes the mean
    slowdown against the per-(shape, M) faster impl, over every measured (shape, M) of the group."""
    m = pairs["M"].to_numpy()
    t_a, t_b = pairs["time_us"].to_numpy(), pairs["time_us_b"].to_numpy()
    best = np.minimum(t_a, t_b)
    candidates = [0, *sorted(set(m.tolist()))]
    slowdowns = [float(np.mean(np.where(m <= t, t_a, t_b) / best)) for t in candidates]
    i = int(np.argmin(slowdowns))  # ties: the smallest threshold
    return candidates[i], slowdowns[i]


SUMMARY_SCHEMA = {**{c: CROSSOVER_SCHEMA[c] for c in CONFIG}, "impl_a": pl.Utf8, "impl_b": pl.Utf8,
                  "n_shapes": pl.Int64, "n_left": pl.Int64, "n_right": pl.Int64,
                  "median_m": pl.Float64, "median_lo": pl.Float64, "median_hi": pl.Float64,
                  "median_label": pl.Utf8, "q25_m": pl.Float64,
                  "q75_m": pl.Float64, "iqr_label": pl.Utf8, "threshold_m": pl.Int64,
                  "threshold_slowdown": pl.Float64}


def crossover_summary(df: pl.DataFrame, impl_a: str = "simt", impl_b: str = "dequant_blas") -> pl.DataFrame:
    """Per config (device, dtype, ...): the crossover over shapes, respecting censoring, and the single
    threshold a dispatcher would use.

    Censoring: a right-censored shape's M* is only known to exceed its m_max_measured, a left-censored
    one's to lie below its m_min_measured. Each quantile is computed twice, once with every censored M* at
    its lower bound (0 for left, m_max for right) and once at its upper bound (m_min for left, infinity
    for right); the true quantile lies between (`median_lo`, `median_hi` for the median). When both agree
    it is reported (`median_m`, `q25_m`, `q75_m`); otherwise those are null and the labels say what is known (`"> 128"`: more than half the
    shapes still favour A at the largest M measured).

    `threshold_m`: dispatch `impl_a` when M <= threshold_m (0: never), chosen to minimize the mean
    slowdown over all measured (shape, M) against always picking the faster impl; `threshold_slowdown`
    is that mean (1.0: the rule is never wrong).
    """
    per_shape = crossovers(df, impl_a, impl_b)
    a, b = _points(df, impl_a, GRID_SWEEPS), _points(df, impl_b, GRID_SWEEPS)
    pairs = a.join(b.select(*POINT, "time_us"), on=list(POINT), suffix="_b")
    rows = []
    for key, g in _groups(per_shape, CONFIG):
        value = g["crossover_m"].to_numpy()
        censored = g["censored"].to_numpy()
        lo = np.where(censored == "right", g["m_max_measured"].to_numpy(), np.where(censored == "left", 0.0, value))
        hi = np.where(censored == "right", np.inf, np.where(censored == "left", g["m_min_measured"].to_numpy(), value))
        lo, hi = lo.astype(float), hi.astype(float)
        med, q25, q75 = (_censored_quantile(lo, hi, q) for q in (0.5, 0.25, 0.75))
        threshold, slowdown = _dispatch_threshold(pairs.filter(*(pl.col(c) == v for c, v in key.items())))
        rows.append({**key, "impl_a": impl_a, "impl_b": impl_b, "n_shapes": g.height,
                     "n_left": int((censored == "left").sum()), "n_right": int((censored == "right").sum()),
                     "median_m": med[0] if med[0] == med[1] else None, "median_lo": med[0],
                     "median_hi": med[1], "median_label": _bounds_label(*med),
                     "q25_m": q25[0] if q25[0] == q25[1] else None,
                     "q75_m": q75[0] if q75[0] == q75[1] else None,
                     "iqr_label": f"{_bounds_label(*q25)} .. {_bounds_label(*q75)}",
                     "threshold_m": threshold, "threshold_slowdown": slowdown})
    return pl.DataFrame(rows, schema=SUMMARY_SCHEMA)


# ---------------------------------------------------------------------------------------------------------
# Latency floors (camping) and wave tails
FLOOR_SCHEMA = {**{c: CROSSOVER_SCHEMA[c] for c in CONFIG}, "arch": pl.Utf8, "shape": pl.Utf8,
                "family": pl.Utf8, "N": pl.Int64, "K": pl.Int64, "bytes": pl.Int64, "t1_us": pl.Float64,
                "model_us": pl.Float64, "floor_us": pl.Float64, "m_floor": pl.Int64,
                "excess_ratio": pl.Float64, "z": pl.Float64, "wave_slowdown": pl.Float64,
                "z_wave": pl.Float64, "label": pl.Utf8, "stable": pl.Boolean}


def _flat_run(t: np.ndarray, tolerance: float) -> int:
    """Number of leading points (from M=1) whose times all lie within `tolerance` of each other."""
    n = 1
    while n < len(t) and t[: n + 1].max() / t[: n + 1].min() <= 1 + tolerance:
        n += 1
    return n


def _robust_z(values: np.ndarray, reference: np.ndarray, mad_floor: float) -> np.ndarray:
    """(value - median) / (1.4826 * MAD) of `reference`; the MAD is floored at `mad_floor` so that a
    near-perfect fit does not turn a few percent into an outlier."""
    median = np.median(reference)
    mad = max(float(np.median(np.abs(reference - median))), mad_floor)
    return (values - median) / (1.4826 * mad)


def bandwidth_model_us(launch_us, bytes_, device_gbps):
    """The bandwidth model: an empty launch plus the bytes at the card's large-read bandwidth, in µs
    (floats, or polars expressions)."""
    return launch_us + bytes_ / (device_gbps * 1e3)


def camping_floors(df: pl.DataFrame, impl: str = "simt", z_threshold: float = 3.5,
                   flat_tolerance: float = 0.10, bytes_window: float = 4.0, min_peers: int = 5,
                   mad_floor: float = 0.05, sm_count: int | None = None,
                   blocks_per_sm: int | None = None) -> pl.DataFrame:
    """Per (config, shape): is `impl` stuck on a latency floor at small M?

    - `model_us`: the bandwidth model at M=1, `launch_us + bytes / device_gbps` from the row itself.
    - `z`: robust z-score of log(t(1) / model_us) among the config's shapes whose M=1 bytes lie within a
      factor `bytes_window` (all of the config's shapes when fewer than `min_peers` do).
    - `m_floor`, `floor_us`: the largest M up to which the time stays within `flat_tolerance` of itself
      from M=1, and the median time over that run; `excess_ratio` = floor_us / model_us.
    - `wave_slowdown`, `z_wave`: the wave-quantization model's predicted slowdown of the bandwidth term
      (see `wave_slowdown`; null for an arch without known geometry) and the z-score once t(1) is
      compared with that wave-aware model instead.
    - `label`: `"wave_tail"` when an outlier (z > z_threshold) stops being one under the wave model,
      else `"camping"` when an outlier is flat up to m_floor >= 2, else `"slow_not_flat"` (an outlier
      whose time already rises from M=1: slow, but not a floor), else `"normal"`. Shapes whose deciding
      rows (M=1 to the first M that breaks the flat run) are unstable are never labelled: `stable` is
      False and they belong in `needs_remeasurement`.
    """
    points = _points(df, impl, GRID_SWEEPS)
    has_m1 = (pl.col("M") == 1).any().over([*CONFIG, "shape"])
    if not points.filter(has_m1).height:
        raise ValueError(f"camping floors need M=1 measurements of {impl!r}; there are none "
                         f"(measure M=1 too: q4lab sweep grid --m 1,2,4,...)")
    skipped = sorted(set(points.filter(~has_m1)["shape"]))
    if skipped:
        warnings.warn(f"camping floors: no M=1 row of {impl!r} for {skipped}; those shapes are left out "
                      f"(re-measure them with M=1)", stacklevel=2)
    points = points.filter(has_m1)
    rows = []
    for key, g in _groups(points, (*CONFIG, "shape", "family", "N", "K")):
        m, t = g["M"].to_numpy(), g["time_us"].to_numpy()
        first = g.row(0, named=True)
        model_us = bandwidth_model_us(first["launch_us"], first["bytes"], first["device_gbps"])
        n_flat = _flat_run(t, flat_tolerance)
        slowdown = wave_slowdown(key["N"], 1, key["K"], first["arch"], sm_count, blocks_per_sm, key["dtype"])
        wave_model_us = first["launch_us"] + (model_us - first["launch_us"]) * (slowdown or 1.0)
        floor_us = float(np.median(t[:n_flat]))
        rows.append({**key, "arch": first["arch"], "bytes": first["bytes"], "t1_us": float(t[0]),
                     "model_us": model_us, "floor_us": floor_us, "m_floor": int(m[n_flat - 1]),
                     "excess_ratio": floor_us / model_us, "wave_slowdown": slowdown,
                     "log_ratio": math.log(t[0] / model_us), "log_ratio_wave": math.log(t[0] / wave_model_us),
                     "stable": bool(g["stable"][: n_flat + 1].all())})
    floors = pl.DataFrame(rows)
    out = []
    for _, g in _groups(floors, CONFIG):
        log_bytes, log_ratio = np.log(g["bytes"].to_numpy()), g["log_ratio"].to_numpy()
        z, z_wave = np.empty(g.height), np.empty(g.height)
        for i in range(g.height):
            peers = np.abs(log_bytes - log_bytes[i]) <= math.log(bytes_window)
            reference = log_ratio[peers] if peers.sum() >= min_peers else log_ratio
            z[i] = _robust_z(log_ratio[i], reference, mad_floor)
            z_wave[i] = _robust_z(g["log_ratio_wave"][i], reference, mad_floor)
        outlier = (z > z_threshold) & g["stable"].to_numpy()
        label = np.where(outlier & (z_wave <= z_threshold) & g["wave_slowdown"].is_not_null().to_numpy(),
                         "wave_tail", np.where(outlier & (g["m_floor"].to_numpy() >= 2), "camping",
                                               np.where(outlier, "slow_not_flat", "normal")))
        out.append(g.with_columns(pl.Series("z", z), pl.Series("z_wave", z_wave), pl.Series("label", label)))
    return pl.concat(out).select(list(FLOOR_SCHEMA)).cast(FLOOR_SCHEMA)


# ---------------------------------------------------------------------------------------------------------
# N-resonance
def _families(n: np.ndarray) -> dict[str, tuple[int | None, np.ndarray]]:
    """Aliasing families over the swept N: name -> (divisor, membership). Multiples of 2^k are the
    classes of N's largest power-of-two factor; multiples of 3 * 2^k hold the 3072 family and its
    relatives; "pow2" is N that are themselves powers of two."""
    families = {"pow2": (None, (n & (n - 1)) == 0)}
    for k in range(6, int(n.max()).bit_length()):
        for divisor in (2 ** k, 3 * 2 ** k):
            families[f"mult_{divisor}"] = (divisor, n % divisor == 0)
    return families


def _robust_trend(x: np.ndarray, y: np.ndarray, window: int, min_scale: float, iterations: int = 4) -> np.ndarray:
    """LOWESS (Cleveland 1979): at each x a tricube-weighted linear fit over its `window` nearest points,
    refit with bisquare weights that drop points far off the curve, so dips do not drag the trend. The
    bisquare scale (6 x the median absolute residual) is floored at `min_scale`: on a near-perfect curve
    a tiny scale would zero the weights of almost every point."""
    n = len(x)
    k = min(window, n)
    robustness = np.ones(n)
    fitted = y.copy()
    for _ in range(iterations + 1):
        for i in range(n):
            distance = np.abs(x - x[i])
            nearest = np.argsort(distance, kind="stable")[:k]
            h = max(distance[nearest].max(), 1e-12) * 1.0001
            w = (1 - (distance[nearest] / h) ** 3) ** 3 * robustness[nearest]
            if w.sum() <= 0:
                continue
            xm = np.average(x[nearest], weights=w)
            ym = np.average(y[nearest], weights=w)
            var = np.average((x[nearest] - xm) ** 2, weights=w)
            slope = np.average((x[nearest] - xm) * (y[nearest] - ym), weights=w) / var if var > 0 else 0.0
            fitted[i] = ym + slope * (x[i] - xm)
        residual = y - fitted
        scale = max(6 * float(np.median(np.abs(residual))), min_scale)
        robustness = np.clip(1 - (residual / scale) ** 2, 0, None) ** 2
    return fitted


PER_N_SCHEMA = {**{c: CROSSOVER_SCHEMA[c] for c in CONFIG}, "K": pl.Int64, "M": pl.Int64, "N": pl.Int64,
                "time_us": pl.Float64, "gbps": pl.Float64, "trend_gbps": pl.Float64,
                "residual": pl.Float64, "stable": pl.Boolean, "flagged": pl.Boolean,
                "pow2_factor": pl.Int64, "family": pl.Utf8}
FAMILY_SCHEMA = {**{c: CROSSOVER_SCHEMA[c] for c in CONFIG}, "K": pl.Int64, "M": pl.Int64,
                 "family": pl.Utf8, "divisor": pl.Int64, "n_swept": pl.Int64, "n_in_family": pl.Int64,
                 "n_flagged": pl.Int64, "flagged_share": pl.Float64, "base_share": pl.Float64,
                 "enrichment": pl.Float64, "hit_rate": pl.Float64, "score": pl.Float64}


def resonance(df: pl.DataFrame, impl: str = "simt", drop: float = 0.10, window: int = 15,
              K: int | None = None, M: int | None = None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """N-sweep resonances of `impl`, per (config, K, M): returns `(per_n, families)`.

    per_n: achieved bandwidth (`bytes / time`) per N, the robust smooth `trend_gbps` through it (LOWESS in
    log N / log GB/s over `window` neighbouring N), `residual` = gbps / trend - 1, and `flagged` = more
    than `drop` below the trend AND stable (an unstable N is never flagged: see `needs_remeasurement`).
    `family` names, for a flagged N, the highest-scoring family it belongs to.

    families: per aliasing family (multiples of 2^k, of 3 * 2^k, and exact powers of two; only those
    that split the swept N), over the stable swept N: `n_flagged`, `flagged_share` (of all flagged N, the
    share in the family), `base_share` (of all swept N, the share in the family), `enrichment` =
    flagged_share / base_share, `hit_rate` (of the family's N, the share flagged) and `score` =
    hit_rate * flagged_share, which is 1 exactly when the family is the flagged set (a sub- or
    super-family has the same enrichment but a lower score).
    """
    points = _points(df, impl, ("nsweep",))
    if K is not None or M is not None:
        available = points.select("K", "M").unique().sort("K", "M").rows()
        points = points.filter(*([pl.col("K") == K] if K is not None else []),
                               *([pl.col("M") == M] if M is not None else []))
        if points.is_empty():
            raise ValueError(f"no N-sweep of {impl!r} at K={K}, M={M}; (K, M) swept: {available}")
    per_n, families = [], []
    for key, g in _groups(points.sort("N"), (*CONFIG, "K", "M")):
        n = g["N"].to_numpy()
        gbps = g["bytes"].to_numpy() / g["time_us"].to_numpy() / 1e3
        trend = np.exp(_robust_trend(np.log(n.astype(float)), np.log(gbps), window, min_scale=drop))
        residual = gbps / trend - 1
        stable = g["stable"].to_numpy()
        flagged = (residual < -drop) & stable
        n_swept, n_flagged = int(stable.sum()), int(flagged.sum())
        table, members = [], {}
        for name, (divisor, member) in _families(n).items():
            member = member & stable
            n_in, n_hit = int(member.sum()), int((member & flagged).sum())
            if not 0 < n_in < n_swept:  # a family holding none or all of the sweep says nothing
                continue
            flagged_share = n_hit / n_flagged if n_flagged else 0.0
            members[name] = member
            table.append({**key, "family": name, "divisor": divisor, "n_swept": n_swept, "n_in_family": n_in,
                          "n_flagged": n_hit, "flagged_share": flagged_share, "base_share": n_in / n_swept,
                          "enrichment": flagged_share / (n_in / n_swept) if n_flagged else None,
                          "hit_rate": n_hit / n_in, "score": n_hit / n_in * flagged_share})
        table.sort(key=lambda r: (-r["score"], -r["n_flagged"], r["divisor"] or 0))
        family_of = [None] * len(n)  # a flagged N's family: the best-scoring one that holds it
        for i in np.flatnonzero(flagged):
            family_of[i] = next((r["family"] for r in table if members[r["family"]][i]), None)
        per_n.append(pl.DataFrame({**{c: [v] * g.height for c, v in key.items()}, "N": n, "time_us": g["time_us"],
                                   "gbps": gbps, "trend_gbps": trend, "residual": residual, "stable": stable,
                                   "flagged": flagged, "pow2_factor": n & -n, "family": family_of},
                                  schema_overrides=PER_N_SCHEMA).select(list(PER_N_SCHEMA)))
        families.append(pl.DataFrame(table, schema=FAMILY_SCHEMA))
    return pl.concat(per_n), pl.concat(families)


def strongest_family(families: pl.DataFrame, min_flagged: int = 2) -> pl.DataFrame:
    """Per (config, K, M) of `resonance`'s families: the best-scoring family with at least `min_flagged`
    flagged N; groups with no such family are left out."""
    return (families.filter(pl.col("n_flagged") >= min_flagged)
            .sort("score", "n_flagged", "divisor", descending=[True, True, False], nulls_last=True)
            .group_by([*CONFIG, "K", "M"], maintain_order=True).first())


# ---------------------------------------------------------------------------------------------------------
def m_inversions(df: pl.DataFrame, impl: str = "simt", tolerance: float = 1.05) -> pl.DataFrame:
    """Grid points where `impl` runs more than `tolerance` x slower than at some larger M of the same config
    and shape. More rows taking less time is no property of the work: it marks an artifact of the kernel's
    tiling or launch, or of how the point was timed, and no crossover or step rule in M can follow it. Per
    point: `faster_m`, the larger M with the least time, its `faster_time_us`, `ratio` = time_us /
    faster_time_us, and `stable` (both points settled). Sorted by ratio, largest first."""
    points = _points(df, impl, GRID_SWEEPS)
    rows = []
    for key, g in _groups(points, (*CONFIG, "shape", "N", "K")):
        m, t, stable = g["M"].to_numpy(), g["time_us"].to_numpy(), g["stable"].to_numpy()
        for i in range(len(m) - 1):
            j = i + 1 + int(np.argmin(t[i + 1:]))
            if t[i] > tolerance * t[j]:
                rows.append({**key, "impl": impl, "M": int(m[i]), "time_us": float(t[i]), "faster_m": int(m[j]),
                             "faster_time_us": float(t[j]), "ratio": float(t[i] / t[j]),
                             "stable": bool(stable[i] and stable[j])})
    schema = {**{c: points.schema[c] for c in (*CONFIG, "shape", "N", "K")}, "impl": pl.Utf8, "M": pl.Int64,
              "time_us": pl.Float64, "faster_m": pl.Int64, "faster_time_us": pl.Float64, "ratio": pl.Float64,
              "stable": pl.Boolean}
    return pl.DataFrame(rows, schema=schema, orient="row").sort("ratio", descending=True)


def needs_remeasurement(df: pl.DataFrame) -> pl.DataFrame:
    """The rows the sweep marked unstable (between-round spread above its tolerance): no analysis flags
    them; re-run their points (`q4lab sweep` resumes) before reading anything into them."""
    return (df.filter(~pl.col("stable"))
            .select(*CONFIG, "sweep", "impl", "shape", "N", "K", "M", "time_us", "spread", "rounds")
            .sort([*CONFIG, "sweep", "impl", "shape", "M"]))


def variant_ratios(df: pl.DataFrame) -> pl.DataFrame:
    """Each kernel variant's time against the shipped kernels' at the same point of the same run (`q4lab bench
    --kernels`: impl "mma@<variant hash>" beside "mma"): `ratio` = variant_time_us / time_us, below 1 the
    variant is faster; `stable` when both rows settled. Rows of other runs are never compared."""
    keys = ["run_id", *CONFIG, "shape", "N", "K", "M"]
    on_variant = (df.filter(pl.col("impl").str.contains("@"))
                  .with_columns(pl.col("impl").str.split_exact("@", 1).struct.rename_fields(["base", "variant"]))
                  .unnest("impl").rename({"base": "impl"}))
    both = df.join(on_variant.select(*keys, "impl", "variant", pl.col("time_us").alias("variant_time_us"),
                                     pl.col("stable").alias("variant_stable")), on=[*keys, "impl"])
    return (both.select(*CONFIG, "shape", "N", "K", "M", "impl", "variant", "time_us", "variant_time_us",
                        (pl.col("variant_time_us") / pl.col("time_us")).alias("ratio"),
                        (pl.col("stable") & pl.col("variant_stable")).alias("stable"))
            .sort("variant", "impl", "dtype", "N", "K", "M"))
