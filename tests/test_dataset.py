"""The dataset contract refuses numbers no analysis can trust, names the file and rows that break it, and
reads a file named twice once; the analyses never answer from bad numbers."""
import math
import re

import polars as pl
import pytest

from q4lab import analysis, dataset, headlines, launch
from q4lab.synthetic import synthetic_dataset


@pytest.fixture(scope="module")
def good():
    return synthetic_dataset(devices=("H100",), dtypes=("fp16",), nsweep=None)


def _with(frame: pl.DataFrame, rows: list[int], **values) -> pl.DataFrame:
    """`frame` with `values` written into the given rows (values keep their column's type)."""
    picked = pl.int_range(pl.len()).is_in(rows)
    return frame.with_columns(pl.when(picked).then(pl.lit(v, dtype=frame.schema[c])).otherwise(pl.col(c)).alias(c)
                              for c, v in values.items())


@pytest.mark.parametrize("values, rule", [
    (dict(time_us=math.nan), "finite and positive"),
    (dict(time_us=-3.0), "finite and positive"),
    (dict(time_us=None), "finite and positive"),
    (dict(time_us_hi=math.inf), "finite and positive"),
    (dict(time_us_lo=50.0, time_us_hi=40.0), "time_us_lo <= time_us_hi"),
    (dict(time_us=1e6), "time_us within"),
    (dict(spread=math.nan), "time_us within"),
    (dict(M=0), "M, N, K >= 1"),
    (dict(K=-128), "M, N, K >= 1"),
    (dict(impl="fused"), "impl one of simt, mma, gemv"),
    (dict(dtype="fp8"), "dtype one of fp16, bf16, fp32"),
])
def test_bad_values_are_refused_naming_file_rule_and_rows(good, tmp_path, values, rule):
    path = tmp_path / "bad.parquet"
    _with(good, [3, 7, 11, 12, 20, 40, 41], **values).write_parquet(path)
    with pytest.raises(dataset.DatasetError) as err:
        dataset.load(path)
    message = str(err.value)
    assert message.startswith(f"{path}: 7 row(s) break") and rule in message
    assert "(rows 3, 7, 11, 12, 20, ...)" in message and "re-run the sweep" in message


def test_a_null_typed_column_is_refused(good, tmp_path):
    path = tmp_path / "null.parquet"
    good.with_columns(pl.lit(None).alias("time_us")).write_parquet(path)
    with pytest.raises(dataset.DatasetError, match=r"null.parquet: columns of the wrong type \{'time_us': 'Null'\}"):
        dataset.load(path)


def test_impl_and_dtype_names_are_the_ones_ops_knows():
    from q4lab import ops
    assert dataset.op_names() == (ops.IMPLS, tuple(ops.DTYPES), ops.KERNEL_IMPLS)


def test_an_impl_is_an_ops_impl_or_a_launch_configuration_of_simt(good):
    for impl in launch.CONFIG_IMPLS:
        dataset.check_values(_with(good, [0], impl=impl))
    for impl in ("simt/r8m1", "simt/r3m2", "simt/r1m16", "simt/r4m8/x", "simt/"):
        with pytest.raises(dataset.DatasetError, match="fixed simt launch configuration"):
            dataset.check_values(_with(good, [0], impl=impl))


def test_a_launch_configuration_added_to_the_launcher_is_a_valid_impl(good, monkeypatch):
    added = _with(good, [0], impl="simt/r8m1")
    with pytest.raises(dataset.DatasetError, match="fixed simt launch configuration"):
        dataset.check_values(added)
    monkeypatch.setattr(launch, "CONFIG_IMPLS", {**launch.CONFIG_IMPLS, "simt/r8m1": (8, 1)})
    dataset.check_values(added)


def test_a_file_named_twice_is_read_once(good, tmp_path):
    path = tmp_path / "d.parquet"
    good.write_parquet(path)
    again = tmp_path / "sub" / ".." / "d.parquet"
    (tmp_path / "sub").mkdir()
    loaded = dataset.load([path, str(path), again, str(tmp_path / "*.parquet")])
    assert loaded.height == good.height
    assert analysis.needs_remeasurement(loaded).height == analysis.needs_remeasurement(good).height


@pytest.mark.parametrize("values", [dict(time_us=math.nan), dict(time_us=-1.0), dict(time_us=None)])
def test_no_analysis_and_no_headline_answers_from_bad_times(good, values):
    bad = _with(good, list(range(good.height)), **values)
    for analyse in (analysis.crossovers, analysis.crossover_summary, analysis.camping_floors):
        with pytest.raises(dataset.DatasetError, match="finite and positive"):
            analyse(bad)
    found = headlines.by_question(bad)
    assert all(line.startswith("not in this data: ") for title in ("Crossovers (simt vs dequant_blas)",
               "Camping outliers", "N-resonance") for line in found[title])
    assert "beats" not in str(found) and not re.search(r"\bnan\b", str(found))


def test_a_report_on_bad_times_stops_before_any_notebook_naming_the_file(good, tmp_path, capsys):
    from q4lab import cli
    bad = tmp_path / "bad.parquet"
    _with(good, [0, 1], time_us=math.nan).write_parquet(bad)
    assert cli.main(["report", "--data", str(bad), "--out", str(tmp_path / "r"), "--live", "no"]) == 2
    err = capsys.readouterr().err
    assert f"q4lab report: error: {bad}: 2 row(s) break 'times (time_us, time_us_lo, time_us_hi) finite" in err
    assert not (tmp_path / "r").exists()
