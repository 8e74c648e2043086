"""One report run writes into an output folder at a time, every file appears whole, a notebook whose
output cannot be read fails alone, and unusable options are refused before any notebook runs."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from q4lab import cli, report, writer_lock
from q4lab.synthetic import synthetic_dataset

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "synthetic.parquet"
    synthetic_dataset(devices=("H100",)).write_parquet(path)
    return path


def test_a_second_run_into_a_held_folder_is_refused_naming_the_holder(data, tmp_path, capsys):
    out = tmp_path / "reports"
    out.mkdir()
    with writer_lock.hold(out / ".q4lab-report.lock", "test", "wait"):
        assert cli.main(["report", "--data", str(data), "--out", str(out), "--live", "no"]) == 2
    err = capsys.readouterr().err
    assert f"q4lab report: error: report folder {out} is in use by pid {os.getpid()} on host " in err
    assert "pass another --out" in err
    assert sorted(p.name for p in out.iterdir()) == [".q4lab-report.lock"]  # nothing written


def test_a_notebook_whose_output_is_unreadable_fails_alone(data, tmp_path, monkeypatch):
    import papermill

    def execute(source, output, **kw):  # "crossover" leaves half a notebook behind, the other a whole one
        text = Path(source).read_text()
        Path(output).write_text(text[:len(text) // 2] if "crossover" in source else text)

    monkeypatch.setattr(papermill, "execute_notebook", execute)
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "notebooks" / ".crossover.99999.partial.ipynb").write_text("{")  # a killed run's leftover
    results = {r.name: r for r in report.build_reports(tmp_path, str(data), ("crossover", "n_resonance"),
                                                       log=lambda *a, **k: None)}
    assert "Notebook does not appear to be JSON" in results["crossover"].error
    assert results["n_resonance"].error is None
    assert "did not run: " in (tmp_path / "crossover.html").read_text()
    assert not (tmp_path / "notebooks" / "crossover.ipynb").exists()
    nbformat.read(tmp_path / "notebooks" / "n_resonance.ipynb", as_version=4)
    assert "FAILED: NotJSONError" in (tmp_path / "index.html").read_text()
    assert not list(tmp_path.rglob("*.partial*"))


@pytest.mark.parametrize("argv, message", [
    (["--timeout", "-5"], "argument --timeout: '-5': give a whole number of at least 1"),
    (["--jobs", "0"], "argument --jobs: '0': give a whole number of at least 1"),
])
def test_bad_numbers_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["report", *argv])
    assert exit.value.code == 2 and message in capsys.readouterr().err


def test_an_unusable_out_is_a_clear_error(data, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for out in (a_file, a_file / "reports"):
        assert cli.main(["report", "--data", str(data), "--out", str(out), "--live", "no"]) == 2
        assert (f"q4lab report: error: --out {out}: cannot write reports there" in capsys.readouterr().err)


@pytest.mark.slow
def test_two_reports_into_one_folder_at_once_leave_one_whole_report(data, tmp_path):
    out = tmp_path / "reports"
    command = [sys.executable, "-m", "q4lab", "report", "--data", str(data), "--out", str(out), "--live", "no",
               "--only", "crossover", "camping_outliers"]
    env = os.environ | {"PYTHONPATH": str(REPO)}
    runs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    outcomes = [(run.wait(timeout=600), run.stderr.read()) for run in runs]
    assert any(code == 0 for code, _ in outcomes), outcomes
    for code, err in outcomes:  # the other finished too, or was refused, saying by whom
        assert code == 0 or (code == 2 and f"report folder {out} is in use by pid " in err), outcomes
    index = (out / "index.html").read_text()
    assert index.rstrip().endswith("</html>") and "FAILED" not in index
    for name in ("crossover", "camping_outliers"):
        nbformat.validate(nbformat.read(out / "notebooks" / f"{name}.ipynb", as_version=4))
        assert (out / f"{name}.html").read_text().rstrip().endswith("</html>")
        assert index.count(f'<a href="{name}.html">{name}</a> — ok') == 1
    assert not list(out.rglob("*.partial*"))
    shutil.rmtree(out)


def test_an_export_that_fails_midway_keeps_the_previous_table_whole(tmp_path, monkeypatch):
    import polars as pl

    from q4lab import tables
    before = pl.DataFrame({"shape": ["a", "b"], "time_us": [1.0, 2.0]})
    tables.export(before, tmp_path, "per_shape")

    def dies_midway(frame, path, **kw):
        Path(path).write_bytes(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(pl.DataFrame, "write_parquet", dies_midway)
    with pytest.raises(OSError, match="disk full"):
        tables.export(before.with_columns(pl.col("time_us") * 2), tmp_path, "per_shape")
    assert pl.read_parquet(tmp_path / "per_shape.parquet").equals(before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["per_shape.csv", "per_shape.parquet"]
