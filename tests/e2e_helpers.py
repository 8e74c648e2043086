"""What the browser tests stand on: a JupyterLab server of their own (free loopback port, token, private
Jupyter dirs, stopped even on failure), Debian's chromium driven by Playwright (no browser download), a
record of every request a page makes, and screenshots of each step kept in test-artifacts/ on failure."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
JUPYTER = ROOT / ".venv" / "bin" / "jupyter"
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
# Headless, as root, and silent: no update, sync or metrics traffic that could pass for a page's own request.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-gpu",
]
# JupyterLab user settings for the test's server: no autosave (the test must not write outputs into the
# repo's notebooks) and no news or update checks (no toast over the page, no request off the machine).
LAB_SETTINGS = {
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"checkForUpdates": False, "fetchNews": "false"},
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
        return False


@dataclass
class LabServer:
    url: str  # http://127.0.0.1:PORT
    token: str
    process: subprocess.Popen
    log_path: Path

    def api(self, path: str, body: dict | None = None):
        """GET `path` of the REST API, or POST `body` to it."""
        request = urllib.request.Request(
            f"{self.url}{path}",
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def wait_for_idle_kernel(self, notebook_path: str, timeout_s: float = 60) -> None:
        """Until the notebook's kernel is idle and the page is connected to it: JupyterLab silently skips
        cells run before its session has a kernel."""
        state = "no session yet"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for session in self.api("/api/sessions"):
                if session["path"] == notebook_path and session["kernel"]:
                    state = f"{session['kernel']['execution_state']}, {session['kernel']['connections']} connection(s)"
                    if session["kernel"]["execution_state"] == "idle" and session["kernel"]["connections"] > 0:
                        return
            time.sleep(0.25)
        raise RuntimeError(
            f"the kernel of {notebook_path} did not start within {timeout_s} s (last state: {state}); "
            f"JupyterLab's log, with the kernel's own output:\n{self.log_tail()}"
        )


@contextmanager
def jupyter_lab(root_dir: Path, work_dir: Path, port: int | None = None, startup_timeout_s: float = 60, env=None):
    """A JupyterLab server from .venv serving `root_dir`, stopped (with its kernels) on exit, even on failure.
    Its Jupyter config, data and runtime dirs live in `work_dir`, apart from the user's own; `env` adds to
    its environment."""
    port = port or free_port()
    if port_in_use(port):
        raise RuntimeError(
            f"port {port} on 127.0.0.1 is already in use (a JupyterLab already running? see `jupyter server list`); "
            "leave the port unset to let the test pick a free one"
        )
    env = {**os.environ, **(env or {})}
    for name in ("JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR"):
        env[name] = str(work_dir / name.lower())
    for relative, settings in LAB_SETTINGS.items():
        path = work_dir / "jupyter_config_dir" / "lab" / "user-settings" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings))
    (work_dir / "checkpoints").mkdir(exist_ok=True)  # must exist, or Jupyter falls back to $TMPDIR
    token = secrets.token_hex(16)
    log_path = work_dir / "jupyter-lab.log"
    command = [
        str(JUPYTER), "lab", "--no-browser", "--allow-root",
        "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root_dir}",
        # opening a notebook writes a checkpoint beside it; keep those out of the repo
        f"--FileCheckpoints.root_dir={work_dir / 'checkpoints'}",
        "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
    ]  # fmt: skip
    with open(log_path, "w") as log:
        # its own process group, so that stopping it reaches everything it started
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = LabServer(f"http://127.0.0.1:{port}", token, process, log_path)
    try:
        deadline = time.monotonic() + startup_timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with status {process.returncode} at start:\n{server.log_tail()}")
            try:
                server.api("/api/status")
                break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"JupyterLab did not answer within {startup_timeout_s} s:\n{server.log_tail()}")
                time.sleep(0.25)
        yield server
    finally:
        stop_process_group(process)


def stop_process_group(process: subprocess.Popen, grace_s: float = 15) -> None:
    # SIGTERM lets the server shut its kernels down (they run in sessions of their own); SIGKILL if it hangs.
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            continue


def is_local(url: str) -> bool:
    parts = urlsplit(url)
    if parts.scheme in ("file", "data", "blob"):
        return True
    return parts.scheme in ("http", "https", "ws", "wss") and parts.hostname in ("127.0.0.1", "localhost", "::1")


class RequestLog:
    """Every URL a page requests, websockets included."""

    def __init__(self, page):
        self.urls: list[str] = []
        page.on("request", lambda request: self.urls.append(request.url))
        page.on("websocket", lambda websocket: self.urls.append(websocket.url))

    def off_machine(self) -> list[str]:
        return [url for url in self.urls if not is_local(url)]


class Steps:
    """Screenshots of each step of a browser test, numbered in order; kept only if the test fails."""

    def __init__(self, page, shots_dir: Path):
        self.page = page
        self.shots_dir = shots_dir
        self.count = 0

    def shot(self, step: str) -> Path:
        self.count += 1
        path = self.shots_dir / f"{self.count:02d}-{step}.png"
        self.page.screenshot(path=path, full_page=True)
        return path


@contextmanager
def screenshots_on_failure(page, work_dir: Path, name: str):
    steps = Steps(page, work_dir / "screenshots")
    steps.shots_dir.mkdir(parents=True, exist_ok=True)
    try:
        yield steps
    except BaseException as err:
        try:
            steps.shot("failure")
        except Exception:  # the page may be gone; the earlier steps' screenshots still tell the story
            pass
        kept = ARTIFACTS / name
        shutil.rmtree(kept, ignore_errors=True)
        shutil.copytree(steps.shots_dir, kept)
        err.add_note(f"screenshots of each step: {kept}")
        raise
