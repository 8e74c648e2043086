"""The command line a new user meets: help with examples, help on every flag, one name for one flag across
subcommands, `q4lab shapes`, a sweep that can measure nothing failing without writing anything, and OS
errors as one line naming the path and the fix."""
import argparse
import errno
import importlib

import pytest

from q4lab import cli, shapes
from q4lab.synthetic import synthetic_dataset


def _parser(command: str) -> argparse.ArgumentParser:
    module_name, _ = cli.COMMANDS[command]
    parser = argparse.ArgumentParser(prog=f"q4lab {command}")
    getattr(importlib.import_module(module_name), f"add_{command}_arguments")(parser)
    return parser


def _flags(parser: argparse.ArgumentParser, where: str):
    """(where, action) of every argument of `parser` and of its subcommands."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _flags(sub, f"{where} {name}")
        elif not isinstance(action, argparse._HelpAction):
            yield where, action


def test_help_says_what_q4lab_is_and_shows_examples(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    assert "dequantize+GEMM" in text and "reports/index.html" in text
    assert "examples:" in text and "q4lab report --data" in text and "q4lab report -p crossover.dtypes=fp32" in text
    assert all(command in text for command in cli.COMMANDS)


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_every_flag_has_help(command):
    missing = [f"{where} {'/'.join(a.option_strings) or a.dest}" for where, a in _flags(_parser(command), command)
               if not a.help]
    assert missing == []


def test_the_sweeps_share_flag_names():
    sweep = _parser("sweep")
    (subcommands,) = [a for a in sweep._actions if isinstance(a, argparse._SubParsersAction)]
    grid, nsweep = subcommands.choices["grid"], subcommands.choices["nsweep"]
    options = {name: {s for a in p._actions for s in a.option_strings} for name, p in (("grid", grid), ("nsweep", nsweep))}
    assert {"--quant-types", "--dtypes", "--impls", "--m", "--blocksize", "--out"} <= options["grid"] & options["nsweep"]
    assert nsweep.parse_args(["--k", "64", "--out", "x", "--quant-type", "fp4"]).quant_types == "fp4"  # old name kept


def test_shapes_lists_the_canonical_shapes(capsys):
    assert cli.main(["shapes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["shape", "family", "N", "K", "model"] and len(lines) == 1 + len(shapes.SHAPES)
    assert lines[1].split()[:4] == ["llama-3.2-1b.kv_proj", "gqa_kv", "512", "2048"]
    assert cli.main(["shapes", "lm_head"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]] == ["llama-3-8b.lm_head", "qwen2.5-7b.lm_head"]
    assert cli.main(["shapes", "llama-3-8b.q_prj"]) == 2
    assert "close matches: ['llama-3-8b.q_proj'" in capsys.readouterr().err


def test_a_sweep_that_can_measure_nothing_fails_and_writes_nothing(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("simt runs on this machine's GPU: nothing to refuse")
    out = tmp_path / "runs" / "x.parquet"
    assert cli.main(["sweep", "grid", "--shapes", "llama-3-8b.q_proj", "--m", "1", "--impls", "simt,gemv",
                     "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "nothing to measure on cpu" in err and "simt: needs a GPU" in err and "--impls dense" in err
    assert not out.exists() and not out.with_suffix(".jsonl").exists()


def test_a_folder_where_a_file_goes_is_one_line_naming_it(tmp_path, capsys):
    data, folder = tmp_path / "data.parquet", tmp_path / "rule.json"
    synthetic_dataset().write_parquet(data)
    folder.mkdir()
    assert cli.main(["dispatch", "fit", str(data), "--out", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("q4lab dispatch: error: Is a directory: ") and f"-> {folder};" in err
    assert err.rstrip().endswith("give a file path")


@pytest.mark.parametrize("error,line", [
    (PermissionError(errno.EACCES, "Permission denied", "/data/x.parquet"),
     "Permission denied: /data/x.parquet; check its permissions, or give a path you can write to"),
    (OSError(errno.ENOSPC, "No space left on device", "runs/x.jsonl"),
     "No space left on device: runs/x.jsonl; the disk is full: free some space, or write somewhere else"),
    (OSError(errno.EIO, "Input/output error", "/mnt/usb/x.parquet"),
     "Input/output error: /mnt/usb/x.parquet; check the path, its permissions and the free disk space"),
    (ConnectionRefusedError("the Ray head at 10.0.0.1:6379 refused"), "the Ray head at 10.0.0.1:6379 refused"),
])
def test_os_errors_are_one_line_with_the_fix(monkeypatch, capsys, error, line):
    def fail(args):
        raise error

    monkeypatch.setattr(shapes, "shapes_command", fail)
    assert cli.main(["shapes"]) == 2
    assert capsys.readouterr().err == f"q4lab shapes: error: {line}\n"
