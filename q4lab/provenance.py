"""Which kernels measured each dataset, and whether today's kernels/ are still those; what a row measured
now records (`current_kernel_hash`, `current_git_commit`).

Every row records `kernel_hash` (kernels.source_hash of the sources its library was built from) and the
`git_commit` it was measured at. Data stays valid whatever today's kernels are (the tests check that the
commit's kernels/ hash to the rows' `kernel_hash`); the reports name each dataset's kernel version and
show a banner when the kernels have changed since, so a kernel edit never waits for a re-measurement.
"""
from __future__ import annotations

import html
import os
import subprocess
from pathlib import Path

import polars as pl

# The command that refreshes a dataset, by its sweeps (data/README.md lists each dataset's command)
REFRESH = {"grid": "q4lab sweep grid --preset shipped --gpus all", "nsweep": "q4lab sweep nsweep ... --gpus all"}
REFRESH_OTHER = "q4lab sweep ..."
# kernel_hash values that name no kernel build: CPU-only impls (""), model numbers (q4lab.synthetic)
NO_KERNELS = ("", "synthetic")


def current_git_commit() -> str:
    """The commit a row measured now records: the environment's Q4LAB_GIT_COMMIT when set (a copy of the
    tree on a GPU machine may carry a stale .git whose HEAD is not what was sent), else HEAD of the checkout
    q4lab runs from, "-dirty" when tracked files differ, else "unknown"."""
    if os.environ.get("Q4LAB_GIT_COMMIT"):
        return os.environ["Q4LAB_GIT_COMMIT"]
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if status.stdout.strip() else "")


def current_kernel_hash() -> str:
    """The kernel_hash a row measured now records: today's kernels/, "" where there is none to hash."""
    from q4lab import kernels

    try:
        return kernels.source_hash()
    except kernels.KernelError:
        return ""


def kernel_versions(files: list[Path]) -> pl.DataFrame:
    """One row per (dataset file, kernel hash, commit): rows, the sweep most of them belong to, and whether
    today's kernels/ are the ones measured (`current`; null where the rows used no kernel build)."""
    from q4lab import kernels

    frames = [pl.read_parquet(f, columns=["device", "kernel_hash", "git_commit", "sweep"])
              .with_columns(file=pl.lit(str(f))) for f in files]
    versions = (pl.concat(frames).group_by("file", "device", "kernel_hash", "git_commit", maintain_order=True)
                .agg(rows=pl.len(), sweep=pl.col("sweep").mode().first()))
    try:
        current = {h: None if h in NO_KERNELS else kernels.is_current(h) for h in versions["kernel_hash"].unique()}
    except kernels.KernelError:  # no kernels/ to compare with (an installed package): nothing to say
        current = {h: None for h in versions["kernel_hash"].unique()}
    return versions.with_columns(current=pl.col("kernel_hash").replace_strict(current, return_dtype=pl.Boolean))


def version_label(kernel_hash: str, git_commit: str) -> str:
    """"kernels 9c1f3c71 at 92d8d90": a short kernel hash and commit (its "-dirty" suffix kept)."""
    commit, _, suffix = git_commit.partition("-")
    return f"kernels {kernel_hash[:8]} at {commit[:7]}{'-' + suffix if suffix else ''}"


def version_lines(versions: pl.DataFrame, root: Path | None = None) -> list[tuple[str, bool]]:
    """(sentence, stale) per version of `kernel_versions`: which kernels measured which file, and for a
    stale one what to run."""
    lines = []
    for v in versions.iter_rows(named=True):
        path = Path(v["file"])
        name = str(path.relative_to(root)) if root and path.is_relative_to(root) else path.name
        if v["current"] is None:
            lines.append((f"{name} ({v['device']}, {v['rows']} rows): no kernel build measured", False))
            continue
        said = f"{name} ({v['device']}, {v['rows']} rows): measured with {version_label(v['kernel_hash'], v['git_commit'])}"
        if v["current"]:
            lines.append((f"{said}, today's kernels", False))
        else:
            command = REFRESH.get(v["sweep"], REFRESH_OTHER)
            lines.append((f"{said}; the kernels have changed since: re-run `{command}` to refresh", True))
    return lines


def versions_html(lines: list[tuple[str, bool]]) -> str:
    """The kernel versions as the top of a report page: stale ones in a banner, the others in a note."""
    stale = [text for text, is_stale in lines if is_stale]
    rest = [text for text, is_stale in lines if not is_stale]
    item = lambda text: f"<li>{html.escape(text)}</li>"  # noqa: E731
    banner = ('<div class="q4lab-stale" style="border:2px solid #b71c1c;background:#fdecea;color:#b71c1c;'
              f'padding:.5em 1em;margin:1em 0"><strong>Stale data:</strong><ul>{"".join(map(item, stale))}</ul></div>'
              if stale else "")
    note = (f'<div class="q4lab-versions" style="font-size:85%;color:#555">Kernel versions:<ul>'
            f'{"".join(map(item, rest))}</ul></div>' if rest else "")
    return banner + note
