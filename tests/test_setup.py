"""The set-up: README's two commands, .ci/run, scripts/setup.sh (idempotent, torch reused or the CPU build,
apt failures loud but not fatal), `make test` failing on an empty run, `make lab`'s port check, and the
Jupyter side of .venv (lab extensions, the `python3` kernel). These run against the .venv that `make test`
has just set up; none of them builds a venv from scratch (too slow for CI)."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv"
VENV_PYTHON = VENV / "bin" / "python"
ANSI = re.compile(r"\x1b\[[0-9;]*m")

pytestmark = pytest.mark.skipif(not VENV_PYTHON.exists(), reason="no .venv: run `make test` (or scripts/setup.sh)")


def run(args, timeout_s=120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s, **kwargs)


def test_readme_starts_with_make_report_and_make_test():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert lines[0].startswith("# "), "README.md should open with its title"
    body = [line for line in lines[1:] if line.strip()]
    assert body[0].startswith("```"), "the first thing under the title should be the commands' code block"
    block = body[1 : body.index("```", 1)]
    commands = [line.split("#")[0].strip() for line in block]
    assert commands == ["make report", "make test"]


def test_ci_run_is_exactly_make_test_and_passes_its_failure_on(tmp_path):
    ci_run = ROOT / ".ci" / "run"
    assert os.access(ci_run, os.X_OK), ".ci/run must be executable"
    code = [line.strip() for line in ci_run.read_text().splitlines()[1:] if line.strip() and not line.startswith("#")]
    assert "set -euo pipefail" in code
    assert [line for line in code if not line.startswith(("set ", "cd "))] == ["make test"]
    # Behaviour: with a `make` that records its arguments and fails, .ci/run fails with its status.
    fake_make = tmp_path / "make"
    fake_make.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/args\nexit 7\n')
    fake_make.chmod(0o755)
    result = run([str(ci_run)], env={**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"})
    assert result.returncode == 7
    assert (tmp_path / "args").read_text().split() == ["test"]


def test_setup_second_run_is_a_fast_noop():
    run(["scripts/setup.sh"], timeout_s=900)  # brings .venv up to date if someone changed pyproject.toml
    freeze_before = run([str(VENV_PYTHON), "-m", "pip", "freeze"]).stdout
    start = time.perf_counter()
    result = run(["scripts/setup.sh"])
    elapsed_s = time.perf_counter() - start
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "setup: .venv is up to date"
    assert elapsed_s < 5, f"a no-op set-up took {elapsed_s:.1f} s"
    assert run([str(VENV_PYTHON), "-m", "pip", "freeze"]).stdout == freeze_before


def test_setup_rejects_unknown_arguments():
    result = run(["scripts/setup.sh", "--sytem"])
    assert result.returncode == 2
    assert "usage: scripts/setup.sh [--system]" in result.stderr


def test_setup_warns_loudly_and_goes_on_when_apt_fails(tmp_path):
    # dpkg-query finds nothing installed and apt-get fails, as without root or network.
    for tool, status in (("dpkg-query", 1), ("apt-get", 100)):
        fake = tmp_path / tool
        fake.write_text(f"#!/bin/sh\nexit {status}\n")
        fake.chmod(0o755)
    result = run(["scripts/setup.sh", "--system"], env={**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"})
    assert result.returncode == 0, result.stderr
    assert "WARNING: apt-get could not install hipcc libamdhip64-dev clang-19 chromium" in result.stderr
    assert "will be SKIPPED" in result.stderr
    assert "setup: .venv is up to date" in result.stdout


def test_venv_torch_is_the_reused_one_or_the_cpu_build():
    probe = "import json, torch; print(json.dumps([torch.__file__, torch.__version__, torch.version.cuda, torch.version.hip]))"
    torch_file, version, cuda, hip = json.loads(run([str(VENV_PYTHON), "-W", "ignore", "-c", probe]).stdout)
    assert (VENV / "q4lab-torch-pin.txt").read_text().strip() == f"torch=={version}", "torch changed after set-up pinned it"
    reuse_pth = list(VENV.glob("lib/python*/site-packages/q4lab-reuse-torch.pth"))
    own_torch = list(VENV.glob("lib/python*/site-packages/torch/__init__.py"))
    if reuse_pth:
        torch_dir = Path(reuse_pth[0].read_text().strip())
        assert Path(torch_file).is_relative_to(torch_dir), f"{torch_file} is not the reused torch in {torch_dir}"
        assert not own_torch, "pip installed a torch into .venv over the reused one"
    else:
        assert Path(torch_file).is_relative_to(VENV)
        cpu_version = re.search(r"^CPU_TORCH_VERSION=(\S+)$", (ROOT / "scripts/setup.sh").read_text(), re.M)[1]
        # the CPU build setup.sh installs, or a GPU build the user put into .venv before set-up
        assert version == f"{cpu_version}+cpu" or cuda or hip, version


@pytest.mark.slow
def test_make_test_fails_when_pytest_collects_nothing():
    result = run(["make", "test", "PYTEST_ARGS=tests/test_setup.py -k no_such_test_anywhere"], timeout_s=300)
    assert result.returncode != 0
    assert "make test: pytest collected no tests" in result.stderr
    assert re.search(r"=+ .*deselected.* in [\d.]+s", result.stdout), "pytest's summary line is missing"


def test_make_lab_says_when_its_port_is_taken():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run(["make", "lab", f"PORT={port}"], timeout_s=60)
    assert result.returncode != 0
    assert f"port {port} on 127.0.0.1 is already in use" in result.stderr
    assert f"make lab PORT={port + 1}" in result.stderr


@pytest.mark.slow
def test_lab_extensions_for_widgets_and_plotly_are_enabled():
    result = run([str(VENV / "bin" / "jupyter"), "labextension", "list"])
    listing = ANSI.sub("", result.stdout + result.stderr)
    for extension in ("@jupyter-widgets/jupyterlab-manager", "jupyterlab-plotly", "anywidget"):
        assert re.search(rf"^\s*{re.escape(extension)} v\S+ enabled OK", listing, re.M), listing
    # plotly >= 6 builds FigureWidget (the prober's live plot) on anywidget
    widget = run([str(VENV_PYTHON), "-c", "import plotly.graph_objects as go; print(type(go.FigureWidget()).__mro__)"])
    assert "anywidget" in widget.stdout, widget.stderr


def test_python3_kernel_runs_the_venv_python(tmp_path):
    # Notebooks name the kernel `python3`; run by .venv's Jupyter (papermill, `make lab`) it must be .venv.
    script = tmp_path / "prefix.py"
    script.write_text("import sys; print('PREFIX=' + sys.prefix)\n")
    result = run([str(VENV / "bin" / "jupyter"), "run", "--kernel=python3", str(script)], timeout_s=120)
    assert f"PREFIX={VENV}" in result.stdout, result.stdout + result.stderr


def test_environment_yml_lists_the_pyproject_dependencies():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = [req for name, reqs in project["optional-dependencies"].items() if name != "all" for req in reqs]
    pip_requirements = {req.replace(" ", "") for req in project["dependencies"] + extras}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = [dep for dep in env["dependencies"] if isinstance(dep, str)]
    pip_section = next(dep["pip"] for dep in env["dependencies"] if isinstance(dep, dict))
    conda_to_pip = {"pytorch": "torch"}
    listed = set(pip_section)
    for dep in conda:
        name = re.match(r"[\w.-]+", dep)[0]
        if name not in ("python", "pip"):
            listed.add(conda_to_pip.get(name, name) + dep[len(name) :])
    assert listed == pip_requirements
    assert "python=3.11" in conda
    assert project["optional-dependencies"]["all"] == [
        f"q4lab[{','.join(name for name in project['optional-dependencies'] if name != 'all')}]"
    ]
