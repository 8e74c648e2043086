"""Kernel versions: the hash covers what the compiler reads (a comment edit keeps it, a code edit changes
it), a dataset of other kernels is named with its version and flagged stale, never refused; the commit a
new row records."""
import shutil
import subprocess
from pathlib import Path

import polars as pl
import pytest

from q4lab import kernels, provenance
from q4lab.synthetic import synthetic_dataset

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def kernel_copy(tmp_path):
    copy = tmp_path / "kernels"
    shutil.copytree(kernels.KERNEL_DIR, copy)
    return copy


def test_comments_and_whitespace_are_not_what_the_compiler_reads():
    source = ('#define X 1 /* two\nlines */\nint a = 2; // "not a string\n'
              'const char* s = "// kept /* kept */";  char c = \'"\';\n\n   int   b;')
    assert kernels.compiled_text(source) == ('#define X 1\nint a = 2;\n'
                                             'const char* s = "// kept /* kept */"; char c = \'"\';\nint b;')


@pytest.mark.parametrize("name", [p.name for p in kernels.sources()])
def test_a_comment_edit_keeps_the_hash_and_a_code_edit_changes_it(kernel_copy, name):
    before = kernels.source_hash(kernel_copy)
    assert before == kernels.source_hash()
    path = kernel_copy / name
    text = path.read_text()
    path.write_text("// a new comment line\n" + text.replace("\n", "  /* and a block */\n", 1) + "\n\n")
    assert kernels.source_hash(kernel_copy) == before
    assert kernels.raw_byte_hash(kernel_copy) != kernels.raw_byte_hash()
    path.write_text(text + "\nstatic int q4_extra_symbol;\n")
    assert kernels.source_hash(kernel_copy) != before


def test_either_hash_of_the_same_sources_is_current(kernel_copy):
    assert kernels.is_current(kernels.source_hash(kernel_copy), kernel_copy)
    assert kernels.is_current(kernels.raw_byte_hash(kernel_copy), kernel_copy)
    assert not kernels.is_current("0123456789abcdef", kernel_copy)


def test_data_of_other_kernels_is_named_and_flagged_stale(tmp_path):
    frame = synthetic_dataset()
    stale = tmp_path / "old.parquet"
    frame.with_columns(kernel_hash=pl.lit("0123456789abcdef"), git_commit=pl.lit("92d8d9063a18")).write_parquet(stale)
    fresh = tmp_path / "new.parquet"
    frame.with_columns(kernel_hash=pl.lit(kernels.source_hash()), git_commit=pl.lit("abcdef0123-dirty")).write_parquet(fresh)
    model = tmp_path / "model.parquet"
    frame.write_parquet(model)
    versions = provenance.kernel_versions([stale, fresh, model])
    assert versions.group_by("file").agg(pl.col("current").first()).sort("file")["current"].to_list() == [None, True, False]
    lines = provenance.version_lines(versions, tmp_path)
    stale_lines = [text for text, is_stale in lines if is_stale]
    assert stale_lines and all(t.startswith("old.parquet (") for t in stale_lines)
    assert ("measured with kernels 01234567 at 92d8d90; the kernels have changed since: re-run "
            f"`{provenance.REFRESH['grid']}` to refresh") in stale_lines[0]
    assert any("new.parquet" in t and "kernels " + kernels.source_hash()[:8] + " at abcdef0-dirty, today's kernels" in t
               for t, _ in lines)
    page = provenance.versions_html(lines)
    assert page.index("Stale data") < page.index("old.parquet") < page.index("Kernel versions") < page.index("new.parquet")
    assert provenance.versions_html([(t, s) for t, s in lines if not s]).count("Stale data") == 0


def test_git_commit_comes_from_the_environment_first_then_the_checkout(monkeypatch):
    monkeypatch.setenv("Q4LAB_GIT_COMMIT", "0123abc")
    assert provenance.current_git_commit() == "0123abc"  # wins over a checkout's (possibly stale) HEAD
    monkeypatch.delenv("Q4LAB_GIT_COMMIT")
    head = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # in a checkout
        assert provenance.current_git_commit().split("-")[0] == head.stdout.strip()

    def no_git(*args, **kwargs):
        raise subprocess.CalledProcessError(128, args[0])

    monkeypatch.setattr(provenance.subprocess, "run", no_git)
    assert provenance.current_git_commit() == "unknown"
