"""Dispatch as a result: which impl `gemm_4bit(impl="auto")` runs for a weight [N, K] at batch size M,
fitted to datasets, and what the choice costs against the fastest impl of every measured point.

A rule holds, per (arch, dtype, quant_type), a small tree over the shape (N, K) whose leaves are step
functions in M ("simt for M <= 12, dequant_blas above"). Where the data holds several devices of one arch,
each of them gets its own trees too, fitted to its points alone, where they differ from the arch's (two
sm_90 cards can need different impls at one point: `disagreements`); a device the data does not hold takes
its arch's trees, fitted to every device of the arch. The rule kinds differ only in how much they may tell apart:

- `single`: one step function per arch (and measured device), over every dtype and shape (the bitsandbytes
  PR's one threshold);
- `per_dtype`: one step function per (arch, dtype, quant_type);
- `shape`: per (arch, dtype, quant_type) a tree of depth <= TREE_DEPTH splitting on N or K at geometric
  midpoints between measured shapes, each leaf holding at least MIN_LEAF_SHAPES shapes;
- `table`: the same tree split until every leaf holds one shape, whatever a split gains (a lookup table of
  the measured shapes; a shape between them takes the leaf of the region it falls in). A split is still
  chosen greedily, by its gain; one that gains nothing is kept too, since the splits below it may.

Every step function minimizes the mean regret over its points, regret = time(chosen) / time(best of the
rule's impls at that point), with at most as many M segments as impls. Points are the grid rows' medians per
(config, shape, M), exactly as `analysis` takes them. `cross_validate` scores rules on shapes they were not
fitted on (one shape family left out at a time), `transfer` on another device's data. Polars in, polars
out, nothing measured here.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from q4lab import dataset
from q4lab.analysis import GRID_SWEEPS, POINT, _points
from q4lab.shapes import MODELS, model_layers

RULE_KINDS = ("single", "per_dtype", "shape", "table")
NOT_DISPATCHED = ("dense", "reference", "bnb", "torch_int4")  # not 4-bit impls of this package: candidates only when named
TREE_DEPTH = 3  # 2 held out worse on the H200 grid with mma (p95 regret 1.27 against 1.18)
MIN_LEAF_SHAPES = 4
MIN_GAIN = 0.25  # a split must remove this share of its node's excess regret (sum of regret - 1)
ANY = "*"         # a key field a rule does not tell apart (single: dtype and quant_type; device: the arch's trees)
SHIPPED = Path(__file__).with_name("dispatch_rule.json")
_UNMEASURED = 1e6  # the regret of an impl not measured at a point: never worth choosing there
# A grid point on any device of one arch: what devices of that arch measured alike
SAME_POINT = ("arch", "dtype", "quant_type", "blocksize", "nested", "cold", "shape", "M")


@dataclass
class Rule:
    kind: str
    impls: list[str]
    trees: dict[tuple[str, str, str, str], dict]  # (arch, device, dtype, quant_type) -> node; ANY matches every value
    provenance: dict = field(default_factory=dict)  # datasets, kernel_hash, git_commit, devices

    def _key(self, arch: str, dtype: str, quant_type: str, device: str) -> tuple[str, str, str, str] | None:
        keys = ((arch, dev, d, q) for dev in dict.fromkeys((device, ANY))
                for d, q in ((dtype, quant_type), (dtype, ANY), (ANY, ANY)))
        return next((k for k in keys if k in self.trees), None)

    def covers(self, arch: str, dtype: str, quant_type: str = "nf4", device: str = ANY) -> bool:
        return self._key(arch, dtype, quant_type, device) is not None

    def tree(self, arch: str, dtype: str, quant_type: str = "nf4", device: str = ANY) -> dict:
        """The tree for a device of `arch`: the one fitted to that `device` where the rule has it, else the arch's."""
        key = self._key(arch, dtype, quant_type, device)
        if key is not None:
            return self.trees[key]
        covered = sorted({(a, d, q) for a, _, d, q in self.trees})
        raise LookupError(f"the {self.kind} rule has nothing for arch {arch!r}, dtype {dtype!r}, {quant_type}; "
                          f"it covers {covered}: fit one on that device's data (q4lab dispatch fit)")

    def choose(self, N: int, K: int, M: int, dtype: str, arch: str, quant_type: str = "nf4", device: str = ANY) -> str:
        node = self.tree(arch, dtype, quant_type, device)
        while "steps" not in node:
            node = node["le"] if {"N": N, "K": K}[node["feature"]] <= node["threshold"] else node["gt"]
        return next(impl for max_m, impl in node["steps"] if max_m is None or M <= max_m)

    def to_json(self) -> str:
        trees = [{"arch": a, "device": v, "dtype": d, "quant_type": q, "tree": t}
                 for (a, v, d, q), t in sorted(self.trees.items())]
        return json.dumps({"kind": self.kind, "impls": self.impls, **self.provenance, "rules": trees}, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "rule") -> Rule:
        """A rule file; one written before rules had per-device trees holds arch trees only."""
        try:
            data = json.loads(text)
            trees = {(r["arch"], r.get("device", ANY), r["dtype"], r["quant_type"]): r["tree"] for r in data.pop("rules")}
            return cls(data.pop("kind"), data.pop("impls"), trees, data)
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{source} is not a dispatch rule ({type(err).__name__}: {err}); write one with "
                             f"`q4lab dispatch fit DATA --out RULE.json`") from None


def load_rule(path: str | Path = SHIPPED) -> Rule:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no dispatch rule {path}: write one with `q4lab dispatch fit DATA --out {path}`")
    return Rule.from_json(path.read_text(encoding="utf-8"), str(path))


def _leaves(node: dict, bounds: dict | None = None):
    """(the shapes a leaf holds, as "1254 < N <= 7663 and K <= 5321", its steps) of every leaf."""
    bounds = bounds or {}
    if "steps" in node:
        where = [f"{lo} < {f} <= {hi}" if lo and hi else f"{f} <= {hi}" if hi else f"{f} > {lo}"
                 for f, (lo, hi) in bounds.items()]
        yield " and ".join(where) or "every shape", node["steps"]
        return
    f, t = node["feature"], node["threshold"]
    lo, hi = bounds.get(f, (None, None))
    yield from _leaves(node["le"], {**bounds, f: (lo, t)})
    yield from _leaves(node["gt"], {**bounds, f: (t, hi)})


def rule_table(rule: Rule) -> pl.DataFrame:
    """The rule as a reader wants it: one row per (arch, device, dtype, quant_type) and shape region, with its
    impls in M order ("simt to M=16, dequant_blas above"); device "*" is the arch's trees, for any other
    device of it."""
    rows = [{"arch": a, "device": v, "dtype": d, "quant_type": q, "shapes": where,
             "impl by M": ", ".join(f"{impl} to M={m}" if m is not None else (f"{impl} above" if len(steps) > 1 else impl)
                                    for m, impl in steps)}
            for (a, v, d, q), tree in sorted(rule.trees.items()) for where, steps in _leaves(tree)]
    return pl.DataFrame(rows, schema={c: pl.Utf8 for c in ("arch", "device", "dtype", "quant_type", "shapes", "impl by M")})


# ---------------------------------------------------------------------------------------------------------
def point_times(df: pl.DataFrame, impls=None) -> tuple[pl.DataFrame, list[str]]:
    """One row per grid point (POINT and arch) with a time_us column per candidate impl (null where that
    impl was not measured), and the candidates: `impls`, or every impl of the grid but NOT_DISPATCHED."""
    grid = df.filter(pl.col("sweep").is_in(GRID_SWEEPS))
    present = sorted(grid["impl"].unique().to_list())
    impls = list(impls) if impls else [i for i in present if i not in NOT_DISPATCHED]
    if not impls:
        raise ValueError(f"no impl to dispatch between: the grid holds {present}; name some with impls=[...]")
    keys = [*POINT, "arch"]
    wide = None
    for impl in impls:
        part = _points(df, impl, GRID_SWEEPS).select(*keys, pl.col("time_us").alias(impl))
        wide = part if wide is None else wide.join(part, on=keys, how="full", coalesce=True)
    return wide.sort(*keys), impls


def _times(times: pl.DataFrame, impls: list[str]) -> np.ndarray:
    """[point, impl] times, infinite where the impl was not measured."""
    t = times.select(impls).to_numpy().astype(float)
    return np.where(np.isnan(t), np.inf, t)


def _regrets(times: pl.DataFrame, impls: list[str]) -> np.ndarray:
    """[point, impl] regrets for fitting. Where a device did not run an impl that another device of its arch
    ran at the same (dtype, quant_type, shape, M), the missing time is estimated from the other device's,
    scaled by the two devices' ratio over the impls both ran (geometric mean; several donors: the geometric
    mean of their estimates). An H100 grid without a new impl then neither vetoes it nor, by ranking the
    others against a best that lacks it, halves the weight of what an H200 grid measured of it. Where no
    device ran an impl, its regret is _UNMEASURED."""
    t = _times(times, impls)
    filled = t.copy()
    known = np.isfinite(t)
    point = times.select(pl.struct(SAME_POINT).rank("dense").alias("p"))["p"].to_numpy()
    gaps = np.flatnonzero((~known).any(axis=1) & known.any(axis=1))
    for r in gaps:
        donors = np.flatnonzero(point == point[r])
        for i in np.flatnonzero(~known[r]):
            logs = [np.log(t[o, i]) + np.mean(np.log(t[r, common] / t[o, common]))
                    for o in donors if known[o, i] and (common := known[r] & known[o]).any()]
            if logs:
                filled[r, i] = np.exp(np.mean(logs))
    regrets = filled / filled.min(axis=1, keepdims=True)
    return np.where(np.isfinite(regrets), regrets, _UNMEASURED)


def _steps(m: np.ndarray, regrets: np.ndarray, impls: list[str]) -> tuple[list, float]:
    """The step function in M (at most as many segments as impls) with the least total regret:
    ([[max_m, impl], ..., [None, impl]], that total). Thresholds sit at measured M; dynamic programming
    over the segments."""
    levels = np.unique(m)
    per_level = np.stack([regrets[m == v].sum(axis=0) for v in levels])  # [level, impl]
    prefix = np.vstack([np.zeros(len(impls)), np.cumsum(per_level, axis=0)])
    n = len(levels)
    segment = prefix[None, :, :] - prefix[:, None, :]          # [a, b, impl]: levels a..b-1 with one impl
    seg_cost, seg_impl = segment.min(axis=2), segment.argmin(axis=2)
    cost = np.full((len(impls) + 1, n + 1), np.inf)
    cost[0, 0] = 0.0
    start = np.zeros((len(impls) + 1, n + 1), dtype=int)
    for s in range(1, len(impls) + 1):
        for b in range(1, n + 1):
            options = cost[s - 1, :b] + seg_cost[:b, b]
            start[s, b] = int(np.argmin(options))
            cost[s, b] = options[start[s, b]]
    s = int(np.argmin(cost[:, n]))  # the fewest segments among equals
    bounds, b = [], n
    while b:
        a = start[s, b]
        bounds.append((a, b))
        b, s = a, s - 1
    steps = []
    for a, b in reversed(bounds):
        impl = impls[seg_impl[a, b]]
        if steps and steps[-1][1] == impl:
            steps.pop()
        steps.append([int(levels[b - 1]), impl])
    steps[-1][0] = None
    return steps, float(cost[:, n].min())


def _grow(points: pl.DataFrame, regrets: np.ndarray, impls: list[str], depth: int, min_leaf_shapes: int = MIN_LEAF_SHAPES,
          min_gain: float | None = MIN_GAIN) -> tuple[dict, float]:
    """A tree over (N, K) with step-function leaves, split greedily while a split pays `min_gain` (None: while
    any split is possible)."""
    m = points["M"].to_numpy()
    steps, cost = _steps(m, regrets, impls)
    best = None
    for feature in ("N", "K") if depth else ():
        values = points[feature].to_numpy()
        levels = np.unique(values)
        for lo, hi in zip(levels[:-1], levels[1:]):
            threshold = round(math.sqrt(lo * hi))
            left = values <= threshold
            if min(points.filter(left)["shape"].n_unique(), points.filter(~left)["shape"].n_unique()) < min_leaf_shapes:
                continue
            split = _steps(m[left], regrets[left], impls)[1] + _steps(m[~left], regrets[~left], impls)[1]
            if best is None or split < best[0]:
                best = (split, feature, threshold, left)
    if best is None or (min_gain is not None and cost - best[0] <= max(min_gain * (cost - len(m)), 1e-9)):
        return {"steps": steps}, cost
    _, feature, threshold, left = best
    le, le_cost = _grow(points.filter(left), regrets[left], impls, depth - 1, min_leaf_shapes, min_gain)
    gt, gt_cost = _grow(points.filter(~left), regrets[~left], impls, depth - 1, min_leaf_shapes, min_gain)
    return {"feature": feature, "threshold": threshold, "le": le, "gt": gt}, le_cost + gt_cost


def _key_columns(kind: str) -> tuple[str, ...]:
    if kind not in RULE_KINDS:
        raise ValueError(f"unknown rule kind {kind!r}; kinds: {', '.join(RULE_KINDS)}")
    return ("arch",) if kind == "single" else ("arch", "dtype", "quant_type")


def fit(df: pl.DataFrame, impls=None, kind: str = "table", datasets=()) -> Rule:
    """The `kind` rule over `impls` (default: every impl of the grid but NOT_DISPATCHED) fitted to the grid
    rows of `df`: trees per arch over all its devices' points, and per device where an arch has several and
    the device's own differ from the arch's (module doc); `datasets` (file names) go into its provenance with
    the rows' kernel hash and commit."""
    columns = _key_columns(kind)
    times, impls = point_times(df, impls)
    regrets = _regrets(times, impls)
    times = times.with_row_index("_row")
    several = times.group_by("arch").agg(pl.col("device").n_unique() > 1).filter("device")["arch"]
    scopes = [(times.with_columns(pl.lit(ANY).alias("device")), ("arch", "device", *columns[1:])),
              (times.filter(pl.col("arch").is_in(several)), ("arch", "device", *columns[1:]))]
    trees = {}
    for points, by in scopes:
        for key, group in points.group_by(by, maintain_order=True):
            rows = regrets[group["_row"].to_numpy()]
            if kind == "table":  # every split that separates shapes, whatever it gains: one leaf a shape
                tree = _grow(group, rows, impls, group["shape"].n_unique(), min_leaf_shapes=1, min_gain=None)[0]
            else:
                tree = _grow(group, rows, impls, TREE_DEPTH if kind == "shape" else 0)[0]
            key = (*key, *[ANY] * (4 - len(by)))
            if trees.get((key[0], ANY, *key[2:])) != tree:  # a device's own trees only where they differ
                trees[key] = tree
    provenance = {"datasets": [Path(d).name for d in datasets],
                  **{c: sorted(df[c].unique().to_list()) for c in ("kernel_hash", "git_commit", "device")}}
    return Rule(kind, impls, trees, provenance)


# ---------------------------------------------------------------------------------------------------------
def candidates(rule: Rule, impls) -> list[str]:
    """Of `impls`, in their order, those the fastest at a point is taken among when `rule` is scored: the
    rule's own and every 4-bit impl of this package (all but NOT_DISPATCHED), so that rules over different
    impls are scored alike."""
    return [i for i in impls if i in rule.impls or i not in NOT_DISPATCHED]


def regret(rule: Rule, df: pl.DataFrame, arch: str | None = None) -> pl.DataFrame:
    """Per grid point of `df`: the rule's `chosen` impl, the `best` impl measured there (of its `candidates`),
    their times and `regret` = time_chosen_us / time_best_us, null where the chosen impl was not measured or
    the rule does not cover the row's arch and dtype (`chosen` null: auto uses its defaults there). `arch`
    applies that arch's rule to every row (transfer to another card)."""
    present = df.filter(pl.col("sweep").is_in(GRID_SWEEPS))["impl"].unique().sort().to_list()
    impls = candidates(rule, present)
    times, _ = point_times(df, impls)
    chosen = [rule.choose(N, K, M, dtype, arch or a, q, v) if rule.covers(arch or a, dtype, q) else None
              for N, K, M, dtype, a, q, v in times.select("N", "K", "M", "dtype", "arch", "quant_type", "device").iter_rows()]
    t = _times(times, impls)
    best = t.argmin(axis=1)
    column = {impl: i for i, impl in enumerate(impls)}
    t_chosen = np.array([t[p, column[c]] if c in column else np.inf for p, c in enumerate(chosen)])
    t_best = t[np.arange(len(t)), best]
    unscored = np.isinf(t_chosen)
    return times.select(*POINT, "arch").with_columns(
        pl.Series("chosen", chosen), pl.Series("best", [impls[i] for i in best]),
        pl.Series("time_chosen_us", np.where(unscored, np.nan, t_chosen)).fill_nan(None),
        pl.Series("time_best_us", t_best),
        pl.Series("regret", np.where(unscored, np.nan, t_chosen / t_best)).fill_nan(None))


def auto_rows(df: pl.DataFrame, rule: Rule | None = None) -> pl.DataFrame:
    """The grid rows of the impl `rule` (default: the shipped one) picks at each point, relabelled impl
    "auto": what gemm_4bit(impl="auto") measures there, for plotting beside the impls themselves. Points
    of an arch or dtype the rule does not cover, or whose pick was not measured, have no auto row."""
    grid = df.filter(pl.col("sweep") == "grid")
    picks = regret(rule or load_rule(), grid).filter(pl.col("time_chosen_us").is_not_null()).select(
        *POINT, pl.col("chosen").cast(pl.Utf8))
    return grid.join(picks, left_on=[*POINT, "impl"], right_on=[*POINT, "chosen"]).with_columns(pl.lit("auto").alias("impl"))


def summarize(regrets: pl.DataFrame, by=("kind",)) -> pl.DataFrame:
    """Mean, median, p95 and worst regret per group, with the points scored and those left unscored (the
    chosen impl unmeasured there)."""
    return (regrets.group_by(list(by), maintain_order=True)
            .agg(pl.col("regret").mean().alias("mean"), pl.col("regret").median().alias("median"),
                 pl.col("regret").quantile(0.95, "linear").alias("p95"), pl.col("regret").max().alias("worst"),
                 pl.col("regret").is_not_null().sum().alias("n_points"),
                 pl.col("regret").is_null().sum().alias("n_unscored")))


def held_out(df: pl.DataFrame, kind: str, folds: str = "family", impls=None) -> pl.DataFrame:
    """`regret` of each point under the `kind` rule fitted without its `folds` value (a family, or a shape)."""
    if folds not in ("family", "shape"):
        raise ValueError(f"folds={folds!r}: leave out one 'family' or one 'shape' at a time")
    grid = df.filter(pl.col("sweep").is_in(GRID_SWEEPS))
    values = grid[folds].unique().sort().to_list()
    if len(values) < 2:
        raise ValueError(f"leaving one {folds} out needs two or more; the grid holds {values}: measure more shapes")
    parts = []
    for value in values:
        rule = fit(grid.filter(pl.col(folds) != value), impls, kind)
        parts.append(regret(rule, grid.filter(pl.col(folds) == value)).with_columns(pl.lit(kind).alias("kind")))
    return pl.concat(parts)


def cross_validate(df: pl.DataFrame, kinds=RULE_KINDS, folds: str = "family", impls=None, by=("kind",)) -> pl.DataFrame:
    """Held-out regret summary (`summarize`) per rule kind: each point scored by a rule that never saw its
    shape family (folds="family") or its shape (folds="shape")."""
    kinds = [kinds] if isinstance(kinds, str) else kinds
    return summarize(pl.concat([held_out(df, k, folds, impls) for k in kinds]), by)


def transfer(df: pl.DataFrame, kinds=RULE_KINDS, impls=None) -> pl.DataFrame:
    """Each rule kind fitted on one device's rows and scored on every device's (its own: in-sample), with
    the fitted device's arch applied to the other's rows: `summarize` per (kind, fitted_on, scored_on)."""
    kinds = [kinds] if isinstance(kinds, str) else kinds
    grid = df.filter(pl.col("sweep").is_in(GRID_SWEEPS))
    devices = grid["device"].unique().sort().to_list()
    parts = []
    for kind in kinds:
        for source in devices:
            part = grid.filter(pl.col("device") == source)
            rule, arch = fit(part, impls, kind), part["arch"][0]
            for target in devices:
                scored = regret(rule, grid.filter(pl.col("device") == target), arch)
                parts.append(scored.with_columns(pl.lit(kind).alias("kind"), pl.lit(source).alias("fitted_on"),
                                                 pl.lit(target).alias("scored_on")))
    return summarize(pl.concat(parts), ("kind", "fitted_on", "scored_on"))


def disagreements(df: pl.DataFrame, impls=None, tolerance: float = 1.10) -> pl.DataFrame:
    """Points measured on two or more devices of one arch whose fastest impls differ. Only impls every one of
    those devices ran there are compared, and a point where some device's fastest is an impl another did not
    run is left out (nothing is known of the other's). `floor` is the least worst regret a single choice
    gets over the devices (`floor_impl`, the choice), i.e. the best any rule keyed by arch can do at that
    point; `beyond` marks floors above `tolerance`. `best_by_device` names each device's fastest. Sorted by
    floor, worst first."""
    times, impls = point_times(df, impls)
    same_point = [*SAME_POINT[:-1], "N", "K", "M"]
    rows = []
    for key, group in times.group_by(same_point, maintain_order=True):
        if group.height < 2:
            continue
        t = _times(group, impls)
        common = np.isfinite(t).all(axis=0)
        if common.sum() < 2 or not common[t.argmin(axis=1)].all():
            continue
        t = t[:, common]
        names = [i for i, c in zip(impls, common) if c]
        best = t.argmin(axis=1)
        if len(set(best)) < 2:
            continue
        worst = (t / t.min(axis=1, keepdims=True)).max(axis=0)
        rows.append({**dict(zip(same_point, key)), "floor": float(worst.min()), "floor_impl": names[int(worst.argmin())],
                     "best_by_device": "; ".join(f"{d}: {names[b]}" for d, b in zip(group["device"], best))})
    schema = {**{c: times.schema[c] for c in same_point}, "floor": pl.Float64, "floor_impl": pl.Utf8,
              "best_by_device": pl.Utf8}
    out = pl.DataFrame(rows, schema=schema, orient="row")
    return out.with_columns((pl.col("floor") > tolerance).alias("beyond")).sort("floor", descending=True)


def card_trees(df: pl.DataFrame, kind: str = "table", impls=None) -> pl.DataFrame:
    """What a card's own trees buy: the `kind` rule fitted to `df` scored on it per device (in sample), with
    each card's trees (`own_*`) and with its arch's alone (`arch_*`, what a card the data lacks gets), as the
    median and worst regret over the points scored with both."""
    rule = fit(df, impls, kind)
    arch_only = Rule(rule.kind, rule.impls, {k: t for k, t in rule.trees.items() if k[1] == ANY}, rule.provenance)
    own, arch = regret(rule, df), regret(arch_only, df)
    both = own.select("device", pl.col("regret").alias("own"), arch["regret"].alias("arch")).drop_nulls()
    return (both.group_by("device", maintain_order=True)
            .agg(pl.len().alias("n_points"), pl.col("own").median().alias("own_median"),
                 pl.col("own").max().alias("own_worst"), pl.col("arch").median().alias("arch_median"),
                 pl.col("arch").max().alias("arch_worst"))
            .sort("device"))


# ---------------------------------------------------------------------------------------------------------
# A whole model: one decode step at batch size M
ROLLUP_SCHEMA = {"device": pl.Utf8, "dtype": pl.Utf8, "quant_type": pl.Utf8, "model": pl.Utf8, "M": pl.Int64,
                 "impl": pl.Utf8, "picks": pl.Utf8, "step_us": pl.Float64, "speedup_vs_dense": pl.Float64, "weights": pl.Int64,
                 "interpolated": pl.Boolean}


def _at(m: np.ndarray, t: np.ndarray, M: int) -> float | None:
    """Time at M, interpolated linearly in log M / log time between the measured M around it (None outside)."""
    if not m[0] <= M <= m[-1]:
        return None
    return float(np.exp(np.interp(math.log(M), np.log(m), np.log(t))))


def measured_models(df: pl.DataFrame) -> list[str]:
    """The models of `shapes.MODELS` whose every weight shape `df`'s grid holds, in that order."""
    held = set(df.filter(pl.col("sweep").is_in(GRID_SWEEPS))["shape"].unique().to_list())
    return [m for m in MODELS if all(s.name in held for s, _ in model_layers(m))]


def rollup(df: pl.DataFrame, rule: Rule, model: str, ms=(1, 8, 64)) -> pl.DataFrame:
    """One decode step of `model` (every weight of `shapes.model_layers` once) at each batch size in `ms`,
    per (device, dtype, quant_type): `step_us` per impl measured on all its shapes, for `auto` (the rule's
    impl per weight) and `best` (the fastest of the rule's `candidates` per weight); `picks` names the impls
    a step runs; `speedup_vs_dense` = dense's step / this step (above 1: faster than the unquantized weight).
    Between measured M each time is interpolated in log-log space (`interpolated`); an impl not measured up
    to M, or an auto that picks an impl this device never ran, has no step time there."""
    layers = model_layers(model)
    names = [s.name for s, _ in layers]
    grid = df.filter(pl.col("sweep").is_in(GRID_SWEEPS), pl.col("shape").is_in(names))
    rows = []
    for (device, dtype, quant_type, arch), g in grid.group_by("device", "dtype", "quant_type", "arch", maintain_order=True):
        curves = {}  # (impl, shape) -> (measured M, median time)
        for (impl, shape), c in g.group_by("impl", "shape"):
            points = c.group_by("M").agg(pl.col("time_us").median()).sort("M")
            curves[(impl, shape)] = (points["M"].to_numpy(), points["time_us"].to_numpy())
        impls = sorted(i for i in g["impl"].unique() if all((i, n) in curves for n in names))
        if not impls:
            missing = sorted(set(names) - set(g["shape"].unique()))
            raise ValueError(f"{model} on {device} ({dtype}): no impl was measured on all its shapes ({missing} "
                             f"missing); measure them: q4lab sweep grid --shapes {','.join(missing or names)}")
        reachable = candidates(rule, impls)
        if not reachable:
            raise ValueError(f"{model} on {device} ({dtype}): of the impls measured on all its shapes ({', '.join(impls)}) "
                             f"none is one the rule picks among ({', '.join(rule.impls)}); measure one: q4lab sweep "
                             f"grid --shapes {','.join(names)} --impls {','.join(rule.impls)}")
        for M in ms:
            times = {i: [_at(*curves[(i, n)], M) for n in names] for i in impls}
            interpolated = {i: any(M not in curves[(i, n)][0] for n in names) for i in impls}
            picks = {i: [i] for i in impls}
            picks["auto"] = [rule.choose(s.N, s.K, M, dtype, arch, quant_type, device) for s, _ in layers]
            times["auto"] = [times[c][j] if c in times else None for j, c in enumerate(picks["auto"])]
            interpolated["auto"] = any(interpolated.get(c, False) for c in picks["auto"])
            picks["best"] = [min(reachable, key=lambda i: np.inf if times[i][j] is None else times[i][j])
                             for j in range(len(layers))]
            times["best"] = [times[i][j] for j, i in enumerate(picks["best"])]
            interpolated["best"] = any(interpolated[i] for i in reachable)
            steps = {i: None if None in t else sum(c * x for (_, c), x in zip(layers, t)) for i, t in times.items()}
            dense = steps.get("dense")
            rows += [{"device": device, "dtype": dtype, "quant_type": quant_type, "model": model, "M": M, "impl": i,
                      "picks": ", ".join(sorted(set(picks[i]))), "step_us": step,
                      "speedup_vs_dense": dense / step if dense and step else None,
                      "weights": sum(c for _, c in layers), "interpolated": interpolated[i]}
                     for i, step in steps.items()]
    return pl.DataFrame(rows, schema=ROLLUP_SCHEMA)


# ---------------------------------------------------------------------------------------------------------
def add_dispatch_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    fit_parser = actions.add_parser("fit", help="fit a rule to datasets and write it as JSON",
                                    description="Fit the rule impl='auto' follows (Q4LAB_DISPATCH=RULE.json uses it; "
                                                f"--out {SHIPPED.parent.name}/{SHIPPED.name} replaces the shipped one).")
    fit_parser.add_argument("data", nargs="+", help="dataset(s): parquet paths or globs")
    fit_parser.add_argument("--out", required=True, help="the rule's JSON file")
    fit_parser.add_argument("--kind", choices=RULE_KINDS, default="table", help="rule kind (default: table)")
    fit_parser.add_argument("--impls", default=None, help="comma-separated impls to choose among (default: every "
                                                          f"impl of the grid but {', '.join(NOT_DISPATCHED)})")


def dispatch_command(args: argparse.Namespace) -> int:
    files = dataset.resolve(args.data)
    frame = dataset.load(files)
    rule = fit(frame, args.impls.split(",") if args.impls else None, args.kind, files)
    out = Path(args.out)
    partial = out.with_name(out.name + ".partial")
    partial.write_text(rule.to_json(), encoding="utf-8")
    os.replace(partial, out)  # a reader never sees half a rule
    fitted = summarize(regret(rule, frame).with_columns(pl.lit(rule.kind).alias("kind"))).row(0, named=True)
    devices = sorted({v for _, v, _, _ in rule.trees} - {ANY})
    print(f"wrote {out}: {rule.kind} rule over {', '.join(rule.impls)} for {', '.join(sorted({k[0] for k in rule.trees}))}"
          + (f" (and, by its own points, each of {', '.join(devices)})" if devices else "") + ", "
          f"from {', '.join(p.name for p in files)}; in-sample regret mean {fitted['mean']:.4f}, p95 "
          f"{fitted['p95']:.3f}, worst {fitted['worst']:.2f} over {fitted['n_points']} points")
    return 0
